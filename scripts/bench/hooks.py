"""Forward-pass cost of tracelens hook adapters, as ratios measured in one process.

Variants, run alternately (A B C ... A B C ...) so drift hits all alike; the median of the rounds is
reported:
  hf plain            the HF model with the tracelens model's attention implementation, no hooks
  hf raw capture      the same HF model, torch forward hooks copying every layer's output to CPU
  hf default ...      both again with HF's default attention (SDPA here); only when it differs
  plain               the tracelens model (TransformerBridge), no hooks
  capture all         MultiLayerCapture of every residual layer
  steer one           one SteeringHook
  project all         MultiLayerProjection of every residual layer
Target: capture and projection within 1.10x of the raw-torch-hook capture.

Prefill capture (a second table): `capture_at_position(..., position="prompt[-1]")` of every layer for
`--batch` texts of different lengths, against what a user would write with HF alone: the tokenizer with
left padding, one forward with torch forward hooks keeping each layer's last-position output (float32, CPU).
Target: tracelens at >= 0.95x the speed of the HF path (time ratio <= 1.05x).

    python scripts/bench/hooks.py [--rounds 10] [--models default,mid] [--attn-implementation eager|sdpa]
"""

from __future__ import annotations

import argparse
import time

from common import add_attention_argument, alternate, hf_default_attention, model_pair, reexec_with_malloc_settings  # noqa: E402

reexec_with_malloc_settings()

import torch  # noqa: E402

from tracelens import (  # noqa: E402
    MultiLayerCapture,
    MultiLayerProjection,
    SteeringHook,
    capture_at_position,
    get_hook_path,
)


def _models(name: str, device: str, attn: str | None):
    return model_pair(name, device, attn, n_layers=16, d_model=768, n_heads=12, n_kv_heads=4, d_mlp=2048)


def _raw_capture(hf):
    """Context manager: torch forward hooks copying each decoder layer's output to CPU."""
    store: list[torch.Tensor] = []

    class Raw:
        def __enter__(self):
            def hook(module, inputs, output):
                out = output[0] if isinstance(output, tuple) else output
                store.append(out.detach().to("cpu"))

            self.handles = [layer.register_forward_hook(hook) for layer in hf.model.layers]
            return self

        def __exit__(self, *exc):
            for h in self.handles:
                h.remove()
            store.clear()

    return Raw()


def bench(name: str, rounds: int, batch: int, seq: int, device: str, attn: str | None) -> None:
    model, hf, desc = _models(name, device, attn)
    same, default = hf.config._attn_implementation, hf_default_attention(hf)
    n, d = model.cfg.n_layers, model.cfg.d_model
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, model.cfg.d_vocab, (batch, seq), generator=g).to(device)
    vec = torch.randn(d, generator=g)
    vectors = {layer: torch.randn(d, generator=g) for layer in range(n)}

    def timed(fn, ctx_factory, hf_attn: str = same):
        def run():
            hf.set_attn_implementation(hf_attn)  # a config switch, untimed; only the HF variants read it
            with ctx_factory():
                start = time.perf_counter()
                fn(ids)
                return time.perf_counter() - start

        return run

    null = lambda: _Null()  # noqa: E731
    variants = {
        "hf plain": timed(hf, null),
        "hf raw capture": timed(hf, lambda: _raw_capture(hf)),
        **({"hf default plain": timed(hf, null, default), "hf default raw capture": timed(hf, lambda: _raw_capture(hf), default)}
           if default != same else {}),
        "plain": timed(model, null),
        "capture all": timed(model, lambda: MultiLayerCapture(model)),
        "steer one": timed(model, lambda: SteeringHook(model, vec, get_hook_path(n // 2), 4.0)),
        "project all": timed(model, lambda: MultiLayerProjection(model, vectors)),
    }
    med = alternate(variants, rounds)
    print(f"\n### {desc}, batch {batch} x {seq} tokens, {rounds} rounds, torch threads {torch.get_num_threads()}\n")
    print(f"hf: {same} attention (as tracelens); hf default: {default} attention\n")
    default_capture = med["hf default raw capture" if default != same else "hf raw capture"]
    print("| variant | median ms | vs plain (tracelens) | vs hf raw capture | vs hf default raw capture |")
    print("|---|---|---|---|---|")
    for k, t in med.items():
        print(f"| {k} | {t * 1e3:.1f} | {t / med['plain']:.3f}x | {t / med['hf raw capture']:.3f}x "
              f"| {t / default_capture:.3f}x |")


def bench_prefill(name: str, rounds: int, batch: int, seq: int, device: str, attn: str | None) -> None:
    """Prefill capture at the last prompt token of every layer: tracelens against HF tokenizer + torch hooks."""
    model, hf, desc = _models(name, device, attn)
    tok = model.tokenizer
    n = model.cfg.n_layers
    g = torch.Generator().manual_seed(1)
    words = ["the", "model", "reads", "a", "long", "prompt", "about", "weather", "and", "answers", "slowly"]
    lengths = torch.randint(seq // 2, seq + 1, (batch,), generator=g).tolist()
    texts = [" ".join(words[int(i)] for i in torch.randint(0, len(words), (k,), generator=g)) for k in lengths]

    def hf_capture() -> torch.Tensor:
        tok.padding_side = "left"
        enc = tok(texts, padding=True, return_tensors="pt").to(device)
        kept: list[torch.Tensor] = []
        hook = lambda module, inputs, output: kept.append(  # noqa: E731
            (output[0] if isinstance(output, tuple) else output)[:, -1].float().cpu())
        handles = [layer.register_forward_hook(hook) for layer in hf.model.layers]
        try:
            with torch.no_grad():
                hf(**enc)
        finally:
            for h in handles:
                h.remove()
        return torch.stack(kept, dim=1)

    def ours() -> torch.Tensor:
        return capture_at_position(model, tok, texts, list(range(n)), "prompt[-1]", pre_formatted=True,
                                   batch_size=batch)

    def timed(fn):
        def run():
            start = time.perf_counter()
            fn()
            return time.perf_counter() - start
        return run

    med = alternate({"hf tokenizer + torch hooks": timed(hf_capture), "capture_at_position": timed(ours)}, rounds)
    print(f"\n### prefill capture, {desc}, {batch} texts of {min(lengths)}-{max(lengths)} words, all {n} layers, "
          f"{rounds} rounds, torch threads {torch.get_num_threads()}\n")
    print("| variant | median ms | time vs hf | speed vs hf |")
    print("|---|---|---|---|")
    base = med["hf tokenizer + torch hooks"]
    for k, t in med.items():
        print(f"| {k} | {t * 1e3:.1f} | {t / base:.3f}x | {base / t:.3f}x |")


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--models", default="default,mid")
    p.add_argument("--device", default="cpu")
    add_attention_argument(p)
    args = p.parse_args()
    for name in args.models.split(","):
        bench(name, args.rounds, args.batch, args.seq, args.device, args.attn_implementation)
        bench_prefill(name, args.rounds, args.batch, args.seq, args.device, args.attn_implementation)


if __name__ == "__main__":
    main()
