"""The `tracelens` command line: a thin shell over the library's public functions."""

from __future__ import annotations

import argparse
import sys
import time


def demo(args: argparse.Namespace) -> None:
    """Load a model, answer one chat prompt greedily, capture one layer's residual, print a summary."""
    import torch

    from tracelens import get_hook_path, load_model

    start = time.perf_counter()
    model = load_model(args.model)
    tok = model.tokenizer
    loaded = time.perf_counter() - start
    text = tok.apply_chat_template(
        [{"role": "user", "content": args.prompt}], tokenize=False, add_generation_prompt=True
    )
    # The chat template writes its own special tokens; do not let the tokenizer add a second BOS.
    ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids.to(model.cfg.device)
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=args.max_new_tokens, do_sample=False, verbose=False)
        answer_ids = out[0, ids.shape[1] :]
        layer = args.layer if args.layer is not None else model.cfg.n_layers // 2
        hook = get_hook_path(layer, "residual", model)
        _, cache = model.run_with_cache(out, names_filter=hook)
    acts = cache[hook][0].float()
    norms = acts.norm(dim=-1)
    print(f"model        {args.model}: {model.cfg.n_layers} layers, d_model {model.cfg.d_model} (loaded in {loaded:.1f}s)")
    print(f"prompt       {args.prompt!r} -> {ids.shape[1]} tokens with the chat template")
    print(f"answer       {tok.decode(answer_ids, skip_special_tokens=True).strip()!r} ({len(answer_ids)} tokens, greedy)")
    print(f"captured     {hook}: {tuple(acts.shape)} (tokens x d_model)")
    print(
        f"token norms  mean {norms.mean():.1f}, min {norms.min():.1f}, max {norms.max():.1f}; "
        f"largest dim {int(acts.abs().amax(dim=0).argmax())} (|value| up to {acts.abs().max():.1f})"
    )
    print(f"total time   {time.perf_counter() - start:.1f}s")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tracelens", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="load the default model, answer a prompt and capture a layer")
    p.add_argument("--model", default="default", help="'default', a local HF folder, or a cached HF id")
    p.add_argument("--prompt", default="What is the capital of France?")
    p.add_argument("--layer", type=int, default=None, help="layer to capture (default: the middle one)")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.set_defaults(func=demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.func(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
