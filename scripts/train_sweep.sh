#!/usr/bin/env bash
# Fine-tune the published tissue-mixpriv-2mm under other mixing settings for the privacy-utility sweep
# (mixpriv audit --sweep-models ...). Each run continues 600 steps from the published weights; the
# third one keeps the default setting, so every sweep model has had the same training.
# Usage: bash scripts/train_sweep.sh [runs folder]   (about 12 minutes per model on 2 CPU cores)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/scripts/setup-env.sh"
runs="${1:-$root/runs}"
data="$("$root/.venv/bin/python" -c 'from mixpriv.data.cohort import build_cohort; print(build_cohort())')"
finetune() {  # name, overrides...
  local name="$1"; shift
  [ -f "$runs/$name/$name/metadata.json" ] && { echo "$name: already trained"; return; }
  "$root/.venv/bin/mixpriv" finetune --from tissue-mixpriv-2mm --data "$data" --out "$runs/$name" \
    --max-steps 600 --name "$name" "$@"
}
finetune sweep-l50-80-r1 "model.lambda_range=[0.5, 0.8]"
finetune sweep-l35-65-r1 "model.lambda_range=[0.35, 0.65]"
finetune sweep-l65-95-r1
finetune sweep-l20-50-r1 "model.lambda_range=[0.2, 0.5]"
finetune sweep-l50-80-r3 "model.lambda_range=[0.5, 0.8]" "model.references_per_mix=3"
