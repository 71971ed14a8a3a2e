#!/usr/bin/env bash
# The main job on a fresh machine: set up ./.venv, then build the embedded cohort, train the CPU
# recipes (or reuse outputs/demo checkpoints), privately segment held-out scans, print the Dice table.
# Extra arguments go to `mixpriv demo` (e.g. --max-cases 4, or recipe overrides trainer.max_steps=200).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup-env.sh"
cd "$root"
exec "$root/.venv/bin/mixpriv" demo "$@"
