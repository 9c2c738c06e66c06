"""The independent path: plain `register_forward_hook` on an untouched HF model.

`hf_module_for(reference, layer, component)` names the HF module whose output each tracelens
component equals; tests read or edit activations there and compare with the bridge.
"""

from __future__ import annotations

import contextlib

import torch

_CONTRIBUTION = {
    # architecture family -> (attention contribution, MLP contribution) module under a decoder layer
    "gemma2": ("post_attention_layernorm", "post_feedforward_layernorm"),
    "llama": ("self_attn.o_proj", "mlp.down_proj"),
}


def hf_module_for(reference: torch.nn.Module, layer: int, component: str) -> str:
    family = "gemma2" if reference.config.model_type in ("gemma2", "gemma3_text") else "llama"
    sub = {
        "residual": "",
        "attn_contribution": _CONTRIBUTION[family][0],
        "mlp_contribution": _CONTRIBUTION[family][1],
        "attn_out": "self_attn.o_proj",
        "mlp_out": "mlp.down_proj",
        "k_proj": "self_attn.k_proj",
        "v_proj": "self_attn.v_proj",
    }[component]
    return f"model.layers.{layer}" + (f".{sub}" if sub else "")


@contextlib.contextmanager
def hf_hooks(reference: torch.nn.Module, edits: dict[str, callable]):
    """Register `fn(output_tensor) -> tensor | None` at HF module paths; tuple outputs edit item 0."""

    def wrap(fn):
        def hook(module, inputs, output):
            tensor = output[0] if isinstance(output, tuple) else output
            new = fn(tensor)
            if new is None:
                return None
            return (new, *output[1:]) if isinstance(output, tuple) else new

        return hook

    handles = [reference.get_submodule(path).register_forward_hook(wrap(fn)) for path, fn in edits.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def hf_capture(reference, input_ids, attention_mask=None, paths=()) -> tuple[torch.Tensor, dict]:
    """Logits and the outputs of the modules at `paths` (clones) from one reference forward."""
    got: dict[str, torch.Tensor] = {}

    def keeper(path):
        def fn(t):
            got[path] = t.detach().clone()

        return fn

    with hf_hooks(reference, {p: keeper(p) for p in paths}), torch.no_grad():
        logits = reference(input_ids, attention_mask=attention_mask).logits
    return logits, got
