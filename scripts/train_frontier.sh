#!/usr/bin/env bash
# Train the privacy-utility frontier of issue 13 to the end: each setting is a full run of the
# tissue-mixpriv recipe (its 2400 steps, segmenter + AdaIN unmixer end to end, from scratch), not a
# fine-tune. One run at a time: on 2 CPU cores two trainings at once are 10x slower each.
# Usage: bash scripts/train_frontier.sh [runs folder] [setting ...]
#   settings: l20-50 l10-30 l35-65-r3 l20-50-r3 (default: all, in this order)
# A run that stopped (session end, max_time cap) resumes where it was: run the script again (each run of
# the script gets its 2 h cap anew: `mixpriv train --resume` counts the cap from where the run stopped).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/scripts/setup-env.sh"
runs="${1:-$root/runs}"; shift || true
declare -A overrides=(
  [l20-50]="model.lambda_range=[0.2, 0.5]"
  [l10-30]="model.lambda_range=[0.1, 0.3]"
  [l35-65-r3]="model.lambda_range=[0.35, 0.65]|model.references_per_mix=3"
  [l20-50-r3]="model.lambda_range=[0.2, 0.5]|model.references_per_mix=3"
)
settings=("$@"); [ ${#settings[@]} -gt 0 ] || settings=(l20-50 l10-30 l35-65-r3 l20-50-r3)
for setting in "${settings[@]}"; do
  [ -n "${overrides[$setting]+x}" ] || { echo "unknown setting $setting; choose from ${!overrides[*]}" >&2; exit 2; }
  out="$runs/frontier-$setting"
  IFS='|' read -r -a args <<< "${overrides[$setting]}"
  if ls "$out"/checkpoints/last.ckpt >/dev/null 2>&1; then resume=(--resume); else resume=(); fi
  "$root/.venv/bin/mixpriv" train --recipe tissue-mixpriv --out "$out" "${resume[@]}" "${args[@]}" \
    "name=frontier-$setting" "trainer.max_time=00:02:00:00"
done
