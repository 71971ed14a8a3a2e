#!/usr/bin/env bash
# Issue 13's "larger or better unmixer": keep a frontier model's segmenter fixed (in eval mode) and train a
# new unmixer on it, for the published default's step budget (2400 steps), as scripts/publish_zoo.py
# --unmixer-stage did for tissue-mixpriv-2mm. The mixing (λ range, references per mixture) stays the model's.
# Usage: bash scripts/train_frontier_unmixer.sh [runs folder] [base model] [unmixer ...]
#   base model: default tissue-mixpriv-2mm-l20-50-r3
#   unmixers: context (the published default's: coarse U-Net 16/32 channels, refinement 16; 10 min on 2 cores)
#             full-wide (the full-resolution AdaIN U-Net the model was trained with, twice as wide: 16/32)
#             (default: both, in this order)
# A finished run (its last.ckpt) is skipped; one that stopped starts again.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/scripts/setup-env.sh"
runs="${1:-$root/runs}"; shift || true
base="${1:-tissue-mixpriv-2mm-l20-50-r3}"; shift || true
declare -A specs=(
  [context]="{channels: [16, 32], include_naive: true, context_scale: 4, refine_channels: 16}"
  [full-wide]="{channels: [16, 32], include_naive: true}"
)
unmixers=("$@"); [ ${#unmixers[@]} -gt 0 ] || unmixers=(context full-wide)
data="$("$root/.venv/bin/python" -c 'from mixpriv.data.cohort import build_cohort; print(build_cohort(progress=False))')"
for unmixer in "${unmixers[@]}"; do
  [ -n "${specs[$unmixer]+x}" ] || { echo "unknown unmixer $unmixer; choose from ${!specs[*]}" >&2; exit 2; }
  out="$runs/$base-$unmixer"
  if [ -f "$out/checkpoints/last.ckpt" ]; then echo "$out is trained; skipping"; continue; fi
  "$root/.venv/bin/mixpriv" finetune --from "$root/checkpoints/$base" --data "$data" --out "$out" --max-steps 2400 \
    --freeze segmenter --name "$base-$unmixer" "model.unmixer=${specs[$unmixer]}" "trainer.check_val_every_n_epoch=4"
done
