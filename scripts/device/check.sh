#!/usr/bin/env bash
# GPU check (about 5 minutes on one H100): correctness on CUDA in fp32 and bf16, then the hooks and
# generation benchmarks, all written as one markdown table to ${OUT:-.}/gpu_check.md; last the real-engine
# vLLM tests (VLLMBackend, and TLVLLMBackend steering/capture through TransformerLens' vLLM driver), which
# report "skipped" unless vLLM 0.20.x is installed (pip install 'transformer-lens[vllm]>=4.3,<4.4').
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
echo "vLLM real-engine tests:" | tee -a "$out"
$py -m pytest -q -p no:cacheprovider -rs tests/test_vllm_backend.py tests/test_tl_vllm_backend.py -k real \
    | tail -n 3 | tee -a "$out"
