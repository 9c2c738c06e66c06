"""What one decode step costs, counted: module calls, Python function calls, torch ops and matmuls.

A decode step's counts are those of a greedy generation of N+1 new tokens minus those of N (cProfile and
torch.profiler), so they include each generator's own per-step Python. Variants (one process):
  hf plain / hf steered       HF `generate` on an untouched copy (same attention), steered = torch forward hook
  bridge plain / steered / steer+cap3   HookedGenerator(fast_path=False): every call through TransformerLens' bridge
  fast plain / steered / steer+cap3     HookedGenerator (the default fast path, tracelens.model.fastpath)
Steering adds a vector at the middle layer's residual; cap3 also captures the residual of 3 layers.
Counts do not depend on machine load; `--repeats N` adds a median decode-step time over N alternating
rounds, which on a shared machine is only indicative.

    python scripts/bench/decode_profile.py [--model default|mid|llama|gemma2|...] [--batch 1] [--repeats 0]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import time

from common import add_attention_argument, model_pair, reexec_with_malloc_settings  # noqa: E402

reexec_with_malloc_settings()

import torch  # noqa: E402

from tracelens import CaptureConfig, HookedGenerator, SteeringConfig  # noqa: E402


def _models(name: str, attn: str | None):
    if name in ("default", "mid"):
        return model_pair(name, "cpu", attn, n_layers=8, d_model=512, n_heads=8, n_kv_heads=4, d_mlp=1536)
    from tracelens.testing import tiny_model

    t = tiny_model(name, attn_implementation=attn)
    return t.model, t.reference, f"tiny random {name} ({t.model.cfg.n_layers} layers)"


def _counts(fn) -> dict[str, int]:
    """Module calls, Python function calls, torch ops and linear/matmul ops of one call of `fn`."""
    prof = cProfile.Profile()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as ops:
        prof.enable()
        fn()
        prof.disable()
    stats = pstats.Stats(prof).stats
    module_calls = sum(v[1] for (path, _, func), v in stats.items()
                       if func == "_call_impl" and path.endswith("torch/nn/modules/module.py"))
    events = [e for e in ops.events() if e.name.startswith("aten::")]
    top = [e for e in events if e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")]
    return {
        "module calls": module_calls,
        "python calls": sum(v[1] for v in stats.values()),
        "torch ops": len(top),
        "matmuls": sum(e.name in ("aten::linear", "aten::matmul", "aten::bmm", "aten::mm", "aten::addmm")
                       for e in top),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default", help="default, mid, or a tiny architecture (llama, gemma2, ...)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt-tokens", type=int, default=24)
    p.add_argument("--steps", type=int, default=4, help="N: the step counted is new token N+1")
    p.add_argument("--repeats", type=int, default=0, help="also time one decode step over this many rounds")
    add_attention_argument(p)
    args = p.parse_args()
    torch.manual_seed(0)

    model, hf, desc = _models(args.model, args.attn_implementation)
    hf.generation_config.eos_token_id = None
    layer = model.cfg.n_layers // 2
    ids = torch.randint(5, model.cfg.d_vocab, (args.batch, args.prompt_tokens))
    mask = torch.ones_like(ids)
    v = torch.randn(model.cfg.d_model)
    v = 4.0 * v / v.norm()
    steer = [SteeringConfig(vector=v, layer=layer)]
    cap3 = CaptureConfig(layers=sorted({max(layer - 2, 0), layer, min(layer + 2, model.cfg.n_layers - 1)}))

    def hf_run(steered: bool):
        def run(n: int):
            handle = (hf.get_decoder().layers[layer].register_forward_hook(
                lambda m, i, o: (o[0] + v,) + tuple(o[1:]) if isinstance(o, tuple) else o + v) if steered else None)
            try:
                hf.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
            finally:
                if handle is not None:
                    handle.remove()
        return run

    def ours(fast: bool, **kw):
        gen = HookedGenerator(model, fast_path=fast)
        return lambda n: gen.generate(ids, mask, n, stop_at_eos=False, **kw)

    variants = {"hf plain": hf_run(False), "hf steered": hf_run(True)}
    for label, fast in (("bridge", False), ("fast", True)):
        variants |= {f"{label} plain": ours(fast), f"{label} steered": ours(fast, steering=steer),
                     f"{label} steer+cap3": ours(fast, steering=steer, capture=cap3)}

    print(f"### one decode step: {desc}, batch {args.batch}, {args.prompt_tokens}-token prompt, "
          f"step {args.steps + 1}, KV cache\n")
    print("| variant | module calls | python calls | torch ops | matmuls |")
    print("|---|---|---|---|---|")
    with torch.inference_mode():
        for name, run in variants.items():
            run(args.steps + 1)  # warm-up: lazy set-up happens on the first call
            more, less = _counts(lambda: run(args.steps + 1)), _counts(lambda: run(args.steps))
            print(f"| {name} | " + " | ".join(str(more[k] - less[k]) for k in more) + " |")

        if args.repeats:
            times: dict[str, list[float]] = {k: [] for k in variants}
            for _ in range(args.repeats):
                for name, run in variants.items():
                    start = time.perf_counter()
                    run(args.steps + 1)
                    mid = time.perf_counter()
                    run(args.steps)
                    times[name].append((mid - start) - (time.perf_counter() - mid))
            print(f"\nmedian decode-step ms over {args.repeats} alternating rounds (shared machine: indicative)\n")
            for name, t in times.items():
                print(f"| {name} | {1000 * statistics.median(t):.1f} |")


if __name__ == "__main__":
    main()
