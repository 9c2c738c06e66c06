"""Correctness on an accelerator: parity, steering conformance and the KV-cache guard, fp32 and bf16.

For each test architecture, dtype and attention implementation (eager, and SDPA where the HF class has
it), on `--device` (default cuda), against the untouched HF model on the same device running the same
implementation: logits and every tracelens site equal HF (max |diff|), steering at a residual layer
equals the same edit as a torch forward hook, and KV-cached greedy generation equals uncached (step
logits). With two or more GPUs it also loads the default model with `device_map="auto"` over them and
checks steering and capture there. Prints a markdown table; exits 1 if a check fails.

    python scripts/device/gpu_check.py [--device cuda] [--out table.md]
"""

from __future__ import annotations

import argparse
import copy
import sys

import torch

from tracelens import COMPONENTS, CaptureHook, HookedGenerator, SteeringHook, get_hook_path, load_model
from tracelens.model.loading import sdpa_supported
from tracelens.testing import ARCHITECTURES, make_tokenizer, tiny_hf_model

TEXT = "The capital of France is Paris, and I am so happy today!"
# fp32 on a GPU is not bit-exact against HF in every kernel (TF32, fused ops); bf16 is looser still.
TOL = {torch.float32: 1e-4, torch.bfloat16: 5e-2}


def _hf_outputs(reference, ids, paths):
    got = {}

    def keep(path):
        def hook(module, inputs, output):
            got[path] = (output[0] if isinstance(output, tuple) else output).detach()

        return hook

    handles = [reference.get_submodule(p).register_forward_hook(keep(p)) for p in paths]
    try:
        with torch.no_grad():
            logits = reference(ids).logits
    finally:
        for h in handles:
            h.remove()
    return logits, got


def _module(reference, layer, component):
    gemma = reference.config.model_type == "gemma2"
    sub = {"residual": "", "attn_contribution": "post_attention_layernorm" if gemma else "self_attn.o_proj",
           "mlp_contribution": "post_feedforward_layernorm" if gemma else "mlp.down_proj",
           "attn_out": "self_attn.o_proj", "mlp_out": "mlp.down_proj", "k_proj": "self_attn.k_proj",
           "v_proj": "self_attn.v_proj"}[component]
    return f"model.layers.{layer}" + (f".{sub}" if sub else "")


def attn_implementations(arch: str) -> list[str]:
    return ["eager", "sdpa"] if sdpa_supported(tiny_hf_model(arch, n_layers=1)) else ["eager"]


def check(arch: str, dtype: torch.dtype, device: str, attn: str) -> dict[str, float]:
    bos = not arch.startswith("qwen")
    hf = tiny_hf_model(arch, n_layers=3, init_std=0.2, dtype=dtype, bos=bos)
    reference = copy.deepcopy(hf).to(device)
    reference.set_attn_implementation(attn)
    model = load_model(hf, make_tokenizer(bos=bos), device=device, attn_implementation=attn)
    ids = model.tokenizer([TEXT], return_tensors="pt").input_ids.to(device)
    sites = {get_hook_path(l, c): _module(reference, l, c) for l in range(3) for c in COMPONENTS}
    ref_logits, ref_acts = _hf_outputs(reference, ids, sites.values())
    with torch.no_grad():
        logits, cache = model.run_with_cache(ids)
    site_err = max((cache[h].flatten(-2) if h.endswith(("hook_k", "hook_v")) else cache[h]).float().sub(
        ref_acts[m].float()).abs().max().item() for h, m in sites.items())
    v = torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(0))
    v = v / v.norm()
    with SteeringHook(model, v, get_hook_path(1), 3.0), torch.no_grad():
        steered = model(ids)
    handle = reference.get_submodule("model.layers.1").register_forward_hook(
        lambda m, i, o: (o[0] + (3.0 * v).to(o[0].dtype).to(o[0].device), *o[1:]) if isinstance(o, tuple)
        else o + (3.0 * v).to(o.dtype).to(o.device))
    with torch.no_grad():
        ref_steered = reference(ids).logits
    handle.remove()
    gen = HookedGenerator(model)
    cached = gen.generate(ids, None, 8, stop_at_eos=False, output_logits=True)[0].logits
    uncached = gen.generate(ids, None, 8, stop_at_eos=False, output_logits=True, use_cache=False)[0].logits
    return {"logits": (logits.float() - ref_logits.float()).abs().max().item(), "sites": site_err,
            "steering": (steered.float() - ref_steered.float()).abs().max().item(),
            "kv cache": (cached - uncached).abs().max().item()}


def check_split(n_gpus: int) -> dict[str, float]:
    """The default model spread over the GPUs: steering and capture follow each layer's device."""
    model = load_model("default", device_map="auto", max_memory={i: "150MiB" for i in range(n_gpus)})
    devices = {str(p.device) for p in model.original_model.parameters()}
    ids = model.tokenizer(["How are you today?"], return_tensors="pt").input_ids.to(model.cfg.device)
    v = torch.ones(model.cfg.d_model) / model.cfg.d_model**0.5
    last = model.cfg.n_layers - 1
    with SteeringHook(model, v, get_hook_path(last), 5.0), CaptureHook(model, get_hook_path(last)) as cap:
        with torch.no_grad():
            model(ids)
    [out] = HookedGenerator(model).generate(ids, None, 4, stop_at_eos=False)
    return {"devices used": float(len(devices)), "captured tokens": float(cap.get().shape[1]),
            "generated": float(len(out.token_ids))}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    name = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else args.device
    lines = [f"### tracelens GPU check on {name}, torch {torch.__version__}", "",
             "| arch | dtype | attention | logits max abs diff | sites max abs diff | steering vs torch hook | cached vs uncached step logits | ok |",
             "|---|---|---|---|---|---|---|---|"]
    ok_all = True
    for dtype in (torch.float32, torch.bfloat16):
        for arch in ARCHITECTURES:
            for attn in attn_implementations(arch):
                r = check(arch, dtype, args.device, attn)
                ok = all(x <= TOL[dtype] for x in r.values())
                ok_all &= ok
                lines.append(f"| {arch} | {str(dtype)[6:]} | {attn} | {r['logits']:.2e} | {r['sites']:.2e} "
                             f"| {r['steering']:.2e} | {r['kv cache']:.2e} | {'yes' if ok else 'NO'} |")
    n_gpus = torch.cuda.device_count() if args.device.startswith("cuda") else 0
    if n_gpus >= 2:
        split = check_split(n_gpus)
        lines += ["", f"default model over {n_gpus} GPUs: {split}"]
    table = "\n".join(lines)
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table + "\n")
    return 0 if ok_all else 1


if __name__ == "__main__":
    sys.exit(main())
