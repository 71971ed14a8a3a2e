#!/usr/bin/env bash
# The GPU checks of issue 11, in one short script for a machine with CUDA and the environment
# already installed (./.venv, e.g. made by scripts/setup-env.sh where the package index is reachable):
#   1. the CUDA / mixed-precision tests (pytest -m gpu), which skip on a CPU;
#   2. training throughput, fp32 against bf16-mixed, baseline and Mixup-Privacy recipes;
#   3. whole-volume private inference on the published models, K = 1 and K = 8, on the GPU.
# Writes its tables and JSON under ${OUT:-outputs/gpu-check}. About 5 minutes on one H200.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
python="${PYTHON:-$root/.venv/bin/python}"
out="${OUT:-$root/outputs/gpu-check}"
mkdir -p "$out"
"$python" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())" \
  | tee "$out/device.txt"
export MIXPRIV_HOME="${MIXPRIV_HOME:-$(mktemp -d)}" WANDB_MODE=offline WANDB_SILENT=true
"$python" -m pytest -q -p no:cacheprovider -m gpu tests 2>&1 | tee "$out/gpu-tests.txt"
for precision in 32-true bf16-mixed; do
  "$python" benchmarks/training_throughput.py --steps 48 --rounds 2 --override "trainer.precision=$precision" \
    --json "$out/training-$precision.json" | tee "$out/training-$precision.md"
done
"$python" benchmarks/private_inference.py --device cuda --batch-size 16 --repeats 5 \
  --json "$out/inference.json" | tee "$out/inference.md"
echo "results in $out"
