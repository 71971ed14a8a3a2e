#!/usr/bin/env bash
# Train the paper's compared systems (issue 16) to the end on the embedded tissue cohort, one at a time
# (on 2 CPU cores two trainings at once are far slower each): recipes tissue-privacynet, tissue-deformproxy.
# Usage: bash scripts/train_compared.sh [runs folder] [privacynet|deformproxy ...]   (default: both)
# A run that stopped (session end, max_time cap) resumes where it was: run the script again.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup-env.sh"
runs="${1:-$root/runs}"; shift || true
systems=("$@"); [ ${#systems[@]} -gt 0 ] || systems=(privacynet deformproxy)
for system in "${systems[@]}"; do
  case "$system" in privacynet|deformproxy) ;; *) echo "unknown system $system; choose privacynet or deformproxy" >&2; exit 2;; esac
  out="$runs/tissue-$system"
  if [ -f "$out/checkpoints/last.ckpt" ]; then resume=(--resume); else resume=(); fi
  "$root/.venv/bin/mixpriv" train --recipe "tissue-$system" --out "$out" "${resume[@]}"
done
