#!/usr/bin/env bash
# Create ./.venv and install mixpriv (editable) with its test extras. Idempotent: skips pip when
# setup.cfg has not changed since the last successful install. Source it or run it.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
python="${PYTHON:-python3}"
if [ ! -x "$venv/bin/python" ]; then
  echo "creating virtual environment in $venv"
  "$python" -m venv "$venv"
fi
stamp="$venv/.mixpriv-installed"
wanted="$(cat "$root/setup.cfg" "$root/pyproject.toml" | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$wanted" ]; then
  echo "installing mixpriv and its dependencies into $venv (first time: a few minutes)"
  "$venv/bin/python" -m pip install --quiet --upgrade pip
  "$venv/bin/python" -m pip install --quiet -e "$root[test]"
  echo "$wanted" > "$stamp"
fi
