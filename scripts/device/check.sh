#!/usr/bin/env bash
# GPU check (about 5 minutes on one H100): correctness on CUDA in fp32 and bf16, then the hooks and
# generation benchmarks, all written as one markdown table to ${OUT:-.}/gpu_check.md.
# Needs a CUDA build of torch in .venv (make setup TORCH_SPEC="torch>=2.6,<2.14").
set -euo pipefail
cd "$(dirname "$0")/../.."
out="${OUT:-.}/gpu_check.md"
py=.venv/bin/python
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | sed 's/^/GPU: /' | tee "$out"
$py scripts/device/gpu_check.py --device cuda --out /tmp/gpu_correctness.md
cat /tmp/gpu_correctness.md >> "$out"
$py scripts/bench/hooks.py --rounds 5 --device cuda | grep -v '^$' | tee -a "$out"
$py scripts/bench/generation.py --rounds 3 --device cuda | grep -v '^$' | tee -a "$out"
