"""Shared set-up of the benchmarks: allocator settings and the model pairs they compare."""

from __future__ import annotations

import copy
import os
import sys

# glibc's default malloc thresholds make large-activation timings swing several-fold on this kind of
# machine; the benchmarks fix them before torch allocates anything.
MALLOC = {"MALLOC_MMAP_THRESHOLD_": "4294967296", "MALLOC_TRIM_THRESHOLD_": "68719476736",
          "MALLOC_TOP_PAD_": "1073741824"}


def reexec_with_malloc_settings() -> None:
    """Restart this script with `MALLOC` in the environment (the allocator reads it at start-up)."""
    if any(os.environ.get(k) != v for k, v in MALLOC.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **MALLOC})


def add_attention_argument(parser) -> None:
    parser.add_argument("--attn-implementation", choices=["eager", "sdpa"], default=None,
                        help="the tracelens model's attention (default: load_model's default, sdpa for these Llamas); "
                             "HF runs the same one, and separately HF's own default")


def model_pair(name: str, device: str = "cpu", attn_implementation: str | None = None, **mid_shape):
    """(tracelens model, untouched HF copy running the same attention implementation, description) for
    "default" or a "mid" random Llama. `hf.set_attn_implementation` switches the copy to another one."""
    from transformers import AutoModelForCausalLM

    from tracelens import load_model
    from tracelens.model.loading import attention_implementation
    from tracelens.testing import make_tokenizer, tiny_hf_model

    if name == "default":
        from tracelens.model.default_model import default_model_path

        path = default_model_path()
        model = load_model(path, device=device, attn_implementation=attn_implementation)
        hf = AutoModelForCausalLM.from_pretrained(path, attn_implementation=attention_implementation(model))
        desc = "default (SmolLM2-135M, 30 layers, d 576)"
    else:
        hf = tiny_hf_model("llama", vocab_size=512, **mid_shape)
        model = load_model(copy.deepcopy(hf), make_tokenizer(), device=device, attn_implementation=attn_implementation)
        hf.set_attn_implementation(attention_implementation(model))
        desc = "mid random Llama (" + ", ".join(f"{k} {v}" for k, v in mid_shape.items()) + ")"
    return model, hf.eval().to(device), f"{desc}, tracelens attention {attention_implementation(model)}"


def hf_default_attention(hf) -> str:
    """The attention implementation `from_pretrained` picks when none is asked for: SDPA where the class has it."""
    return "sdpa" if hf._supports_sdpa else "eager"


def alternate(variants, rounds: int) -> dict[str, float]:
    """Median seconds of each variant (a callable returning its own elapsed seconds): one warm-up
    call each, then `rounds` rounds running every variant in turn, so drift hits all alike."""
    import statistics

    import torch

    times: dict[str, list[float]] = {k: [] for k in variants}
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    with torch.inference_mode():
        for fn in variants.values():
            fn()
        for _ in range(rounds):
            for k, fn in variants.items():
                sync()
                times[k].append(fn())
    return {k: statistics.median(t) for k, t in times.items()}
