"""Generation throughput (tokens/s) of HookedGenerator against HF `generate`, in one process.

Variants, run alternately each round (median over rounds reported), greedy, 64 new tokens (--new-tokens), no early stop:
  hf plain            HF `generate` on an untouched copy of the model, same attention as the tracelens model
  hf steered          the same with a torch forward hook adding a vector at one layer
  hf default plain    HF `generate` with HF's default attention (SDPA here); only when it differs
  hf default steered  the same, steered
  tl steered          TransformerLens `bridge.generate` under a SteeringHook
  hooked plain        HookedGenerator
  hooked steered      HookedGenerator with one SteeringConfig
  hooked steer+cap3   HookedGenerator, steered, capturing the residual of 3 layers per token
  bridge steered      HookedGenerator(fast_path=False), steered: every call through the whole bridge
Peak memory: this process's peak resident set after each table (all variants so far together).
Targets (issue 14): hooked steered >= 1.0x hf steered at batch 1 and 8; steer + capture >= 0.95x. The last column
compares against HF steered with its default attention, what a user running plain HF would get.

    python scripts/bench/generation.py [--rounds 3] [--models default,mid] [--batches 1,8]
                                       [--attn-implementation eager|sdpa] [--new-tokens 64]
"""

from __future__ import annotations

import argparse
import resource
import time

from common import add_attention_argument, alternate, hf_default_attention, model_pair, reexec_with_malloc_settings  # noqa: E402

reexec_with_malloc_settings()

import torch  # noqa: E402

from tracelens import CaptureConfig, HookedGenerator, SteeringConfig, SteeringHook, get_hook_path  # noqa: E402



def _models(name: str, device: str, attn: str | None):
    return model_pair(name, device, attn, n_layers=8, d_model=512, n_heads=8, n_kv_heads=4, d_mlp=1536)


def bench(name: str, batch: int, rounds: int, device: str, attn: str | None, new_tokens: int) -> None:
    model, hf, desc = _models(name, device, attn)
    same, default = hf.config._attn_implementation, hf_default_attention(hf)
    hf.generation_config.eos_token_id = None  # no early stop: every variant makes exactly new_tokens
    layer = model.cfg.n_layers // 2
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, model.cfg.d_vocab, (batch, 24), generator=g).to(device)
    mask = torch.ones_like(ids)
    v = torch.randn(model.cfg.d_model, generator=g).to(device)
    v = v / v.norm()
    gen = HookedGenerator(model)
    bridge = HookedGenerator(model, fast_path=False)
    steer = [SteeringConfig(vector=v, layer=layer, coefficient=4.0)]
    cap3 = CaptureConfig(layers=[layer - 2, layer, layer + 2])

    def hf_plain():
        hf.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)

    def hf_steered():
        handle = hf.model.layers[layer].register_forward_hook(lambda m, i, o: (o[0] + 4.0 * v,) + tuple(o[1:])
                                                              if isinstance(o, tuple) else o + 4.0 * v)
        try:
            hf_plain()
        finally:
            handle.remove()

    def tl_steered():
        with SteeringHook(model, v, get_hook_path(layer), 4.0):
            model.generate(ids, max_new_tokens=new_tokens, do_sample=False, stop_at_eos=False, verbose=False)

    def timed(fn, hf_attn: str = same):
        def run():
            hf.set_attn_implementation(hf_attn)  # a config switch, untimed; only the HF variants read it
            start = time.perf_counter()
            fn()
            return time.perf_counter() - start

        return run

    variants = {
        "hf plain": timed(hf_plain),
        "hf steered": timed(hf_steered),
        **({"hf default plain": timed(hf_plain, default), "hf default steered": timed(hf_steered, default)}
           if default != same else {}),
        "tl steered": timed(tl_steered),
        "hooked plain": timed(lambda: gen.generate(ids, mask, new_tokens, stop_at_eos=False)),
        "hooked steered": timed(lambda: gen.generate(ids, mask, new_tokens, steering=steer, stop_at_eos=False)),
        "hooked steer+cap3": timed(lambda: gen.generate(ids, mask, new_tokens, steering=steer, capture=cap3,
                                                        stop_at_eos=False)),
        "bridge steered": timed(lambda: bridge.generate(ids, mask, new_tokens, steering=steer, stop_at_eos=False)),
    }
    med = alternate(variants, rounds)
    tps = {k: batch * new_tokens / t for k, t in med.items()}
    default_steered = tps["hf default steered" if default != same else "hf steered"]
    print(f"\n### {desc}, batch {batch}, {new_tokens} new tokens, {rounds} rounds, torch threads {torch.get_num_threads()}\n")
    print(f"hf: {same} attention (as tracelens); hf default: {default} attention\n")
    print("| variant | tokens/s | vs hf plain | vs hf steered | vs hf default steered |")
    print("|---|---|---|---|---|")
    for k, t in tps.items():
        print(f"| {k} | {t:.1f} | {t / tps['hf plain']:.3f}x | {t / tps['hf steered']:.3f}x | {t / default_steered:.3f}x |")
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\nprocess peak RSS so far: {peak_mib:.0f} MiB")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--models", default="default,mid")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--device", default="cpu")
    p.add_argument("--new-tokens", type=int, default=64)
    add_attention_argument(p)
    args = p.parse_args()
    for name in args.models.split(","):
        for batch in (int(b) for b in args.batches.split(",")):
            bench(name, batch, args.rounds, args.device, args.attn_implementation, args.new_tokens)


if __name__ == "__main__":
    main()
