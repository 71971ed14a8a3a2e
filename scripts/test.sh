#!/usr/bin/env bash
# The test suite on a fresh machine: set up ./.venv, then run pytest (CPU; GPU tests skip without CUDA).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup-env.sh"
cd "$root"
export MIXPRIV_HOME="${MIXPRIV_HOME:-$(mktemp -d)}"  # never touch the user's cache from tests
export WANDB_MODE=offline WANDB_SILENT=true
exec "$root/.venv/bin/python" -m pytest -q -p no:cacheprovider "$@"
