"""Hook sites: (layer, component) and HF module paths mapped to TransformerLens hook names.

Components and what each TL hook holds (raw-mode bridge, equal to the HF module output):

    residual           blocks.L.hook_resid_post   decoder-layer output (before the final norm at the last layer)
    attn_contribution  blocks.L.hook_attn_out     what attention adds to the residual (Gemma-2: after its post-norm)
    mlp_contribution   blocks.L.hook_mlp_out      what the MLP adds to the residual (Gemma-2: after its post-norm)
    attn_out           blocks.L.attn.hook_out     raw o_proj output
    mlp_out            blocks.L.mlp.hook_out      raw down_proj output
    k_proj, v_proj     blocks.L.attn.hook_k/_v    k_proj/v_proj outputs as [batch, pos, n_kv_heads, d_head], pre-RoPE

All of them fire under both attention implementations; `EAGER_ONLY_HOOKS` fire only under eager.
"""

from __future__ import annotations

import difflib
import re

import torch
from transformer_lens.model_bridge import TransformerBridge
from transformer_lens.model_bridge.generalized_components.base import GeneralizedComponent

from tracelens.errors import ConfigError, InputTypeError
from tracelens.model.loading import attention_implementation

COMPONENTS: dict[str, str] = {
    "residual": "blocks.{layer}.hook_resid_post",
    "attn_contribution": "blocks.{layer}.hook_attn_out",
    "mlp_contribution": "blocks.{layer}.hook_mlp_out",
    "attn_out": "blocks.{layer}.attn.hook_out",
    "mlp_out": "blocks.{layer}.mlp.hook_out",
    "k_proj": "blocks.{layer}.attn.hook_k",
    "v_proj": "blocks.{layer}.attn.hook_v",
}

EAGER_ONLY_HOOKS = ("hook_attn_scores", "hook_pattern", "hook_rot_q", "hook_rot_k", "hook_cos", "hook_sin",
                    "hook_q_normed", "hook_k_normed")
"""Attention hook points that only TransformerLens' eager attention computes (scores, pattern, RoPE'd q/k
and its inputs, q/k norms as TL names them); a model loaded with attn_implementation="sdpa" never fires them."""


def resolve_layer(layer: int, n_layers: int) -> int:
    """`layer` as an index in [0, n_layers); negative layers count from the end."""
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise InputTypeError(f"layer must be an int; got {type(layer).__name__} {layer!r}")
    if not -n_layers <= layer < n_layers:
        raise ConfigError(
            f"layer {layer} is out of range for a model with {n_layers} layers "
            f"(valid: 0..{n_layers - 1}, or -{n_layers}..-1 from the end)"
        )
    return layer % n_layers


def get_hook_path(layer: int, component: str = "residual", model: TransformerBridge | None = None) -> str:
    """The TL hook name for `component` at `layer`, e.g. `get_hook_path(3)` -> "blocks.3.hook_resid_post".

    With `model`, the layer is range-checked and a negative layer counts from the end; without it a
    negative layer is an error (the depth is unknown).
    """
    if component not in COMPONENTS:
        raise ConfigError(f"unknown component {component!r}; valid components: {', '.join(COMPONENTS)}")
    if model is not None:
        layer = resolve_layer(layer, model.cfg.n_layers)
    elif isinstance(layer, bool) or not isinstance(layer, int):
        raise InputTypeError(f"layer must be an int; got {type(layer).__name__} {layer!r}")
    elif layer < 0:
        raise ConfigError(f"negative layer {layer} needs model= to count from the end")
    return COMPONENTS[component].format(layer=layer)


_HEAD_SITES = {"attn.hook_k": "kv", "attn.hook_v": "kv", "attn.k.hook_out": "kv", "attn.v.hook_out": "kv",
               "attn.hook_q": "q", "attn.q.hook_out": "q", "attn.hook_z": "q"}
_MODEL_WIDTH_SITES = ("hook_out", "hook_in", "hook_attn_out", "hook_mlp_out", "attn.hook_out", "mlp.hook_out",
                      "ln1_post.hook_out", "ln2_post.hook_out")


def site_width(model: TransformerBridge, hook_name: str) -> int | None:
    """Flat width of the activation at `hook_name` (heads x d_head at head-split sites), when known without
    running the model; None otherwise."""
    cfg = model.cfg
    leaf = hook_name.split(".", 2)[-1] if hook_name.startswith("blocks.") else hook_name
    kind = _HEAD_SITES.get(leaf)
    if kind == "kv":
        return (getattr(cfg, "n_key_value_heads", None) or cfg.n_heads) * cfg.d_head
    if kind == "q":
        return cfg.n_heads * cfg.d_head
    if leaf.startswith("hook_resid") or leaf in _MODEL_WIDTH_SITES:
        return cfg.d_model
    return None


class ContributionPath(str):
    """An HF module name relative to a decoder layer (the seed's value), with its TL hook template.

    `str(path)` is the module name, e.g. "self_attn.o_proj"; `path.hook` is e.g. "blocks.{layer}.hook_attn_out".
    """

    hook: str

    def __new__(cls, module: str, hook: str) -> "ContributionPath":
        obj = super().__new__(cls, module)
        obj.hook = hook
        return obj

    @property
    def module(self) -> str:
        return str(self)


def detect_contribution_paths(model: TransformerBridge | torch.nn.Module) -> dict[str, ContributionPath]:
    """Which HF module (and TL hook) holds what attention and the MLP add to the residual stream.

    Gemma-2 and Gemma-3 (post-norms): post_attention_layernorm / post_feedforward_layernorm.
    Llama, Mistral, Qwen: self_attn.o_proj / mlp.down_proj. Anything else raises ValueError.
    """
    layer = _first_decoder_layer(model)
    children = {name for name, _ in layer.named_children()}
    arch = type(getattr(model, "original_model", model)).__name__
    if {"pre_feedforward_layernorm", "post_feedforward_layernorm", "post_attention_layernorm"} <= children:
        modules = ("post_attention_layernorm", "post_feedforward_layernorm")
    elif {"self_attn", "mlp"} <= children:
        modules = ("self_attn.o_proj", "mlp.down_proj")
    else:
        raise ConfigError(
            f"cannot tell where attention and MLP contributions are in {arch}: its first decoder layer "
            f"has children {sorted(children)}; expected self_attn and mlp (Llama/Mistral/Qwen) or "
            "post_attention_layernorm, pre_/post_feedforward_layernorm (Gemma-2)"
        )
    return {
        "attn_contribution": ContributionPath(modules[0], COMPONENTS["attn_contribution"]),
        "mlp_contribution": ContributionPath(modules[1], COMPONENTS["mlp_contribution"]),
    }


def _first_decoder_layer(model: torch.nn.Module) -> torch.nn.Module:
    hf = getattr(model, "original_model", model)
    for path in ("model.layers", "model.language_model.layers", "base_model.model.model.layers"):
        try:
            layer = hf.get_submodule(path)[0]
        except (AttributeError, IndexError, TypeError):
            continue
        # In a bridge the HF layer is wrapped; its own children sit under _original_component.
        return getattr(layer, "_original_component", layer)
    raise ConfigError(
        f"cannot find decoder layers in {type(hf).__name__}: looked for model.layers, "
        "model.language_model.layers and base_model.model.model.layers"
    )


_HF_LAYER_PATH = re.compile(r"^(?:.*\.)?layers\.(?P<layer>\d+)(?:\.(?P<sub>.+))?$")

# HF module paths under a decoder layer that the original system used, by component.
_HF_SUBMODULES = {"": "residual", "self_attn.o_proj": "attn_out", "mlp.down_proj": "mlp_out",
                  "self_attn.k_proj": "k_proj", "self_attn.v_proj": "v_proj"}


def resolve_hook_name(model: TransformerBridge, path: str) -> str:
    """The TL hook name for `path`: a TL hook name (returned as given) or an HF module path.

    An HF module path maps to the hook holding that module's output, so code written for HF forward
    hooks runs unchanged: "model.layers.16" -> `blocks.16.hook_resid_post`, "...self_attn.o_proj" ->
    `attn_out`, Gemma-2 "...post_attention_layernorm" -> `attn_contribution` (as `get_hook_path` names
    them); any other wrapped module maps to its bridge component's `hook_out`.
    """
    if not isinstance(path, str):
        raise InputTypeError(f"hook path must be a str; got {type(path).__name__}")
    hooks = model.hook_dict
    if path in hooks:
        _check_fires(model, path)
        return path
    match = _HF_LAYER_PATH.match(path)
    if match:
        module = _walk_hf_path(model, path)
        sub = match["sub"] or ""
        contributions = detect_contribution_paths(model)
        known = {**_HF_SUBMODULES, **{p.module: c for c, p in contributions.items()}}
        if sub in known:
            return get_hook_path(int(match["layer"]), known[sub], model)
        hook_out = getattr(module, "hook_out", None) if isinstance(module, GeneralizedComponent) else None
        if hook_out is None or hook_out.name is None:
            raise ConfigError(
                f"HF module {path!r} ({type(module).__name__}) has no TransformerLens hook; "
                "use a TL hook name such as get_hook_path(layer, component)"
            )
        return hook_out.name
    close = difflib.get_close_matches(path, list(hooks), n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise ConfigError(
        f"unknown hook point {path!r}: neither a TransformerLens hook name nor an HF module path "
        f"like 'model.layers.3'{hint} get_hook_path(layer, component) builds valid names."
    )


def _check_fires(model: TransformerBridge, name: str) -> None:
    """Raise when hook point `name` never fires because the model runs SDPA attention."""
    implementation = attention_implementation(model)
    if implementation == "eager":
        return
    point = model.hook_dict[name]
    if any(getattr(block.attn, hook, None) is point for block in model.blocks for hook in EAGER_ONLY_HOOKS):
        raise ConfigError(
            f"hook point {name!r} must be hooked on a model loaded with attn_implementation='eager'; got a model "
            f"running {implementation!r} attention, which never computes it (attention pattern, scores and "
            "rotated queries/keys exist only in eager attention). Load it with "
            "load_model(..., attn_implementation='eager')."
        )


def _walk_hf_path(model: TransformerBridge, path: str) -> torch.nn.Module:
    """Follow an HF dotted path through the bridge-wrapped HF model, stepping into wrappers."""
    module: torch.nn.Module = model.original_model
    for i, part in enumerate(path.split(".")):
        nxt = _child(module, part)
        if nxt is None:
            raise ConfigError(
                f"HF module path {path!r}: {type(module).__name__} at "
                f"{'.'.join(path.split('.')[:i]) or '<root>'} has no child {part!r}"
            )
        module = nxt
    return module


def _child(module: torch.nn.Module, part: str) -> torch.nn.Module | None:
    for owner in (module, getattr(module, "_original_component", None)):
        if owner is None:
            continue
        if part.isdigit() and isinstance(owner, (torch.nn.ModuleList, torch.nn.Sequential)):
            return owner[int(part)] if int(part) < len(owner) else None
        child = owner._modules.get(part)
        if child is not None:
            return child
    return None
