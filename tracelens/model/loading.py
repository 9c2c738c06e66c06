"""`load_model`: any supported causal LM as a raw-mode TransformerLens `TransformerBridge`.

Raw mode (no weight processing) keeps every activation bit-identical to the HF model run with the
same attention implementation. The bridge wraps the HF model in place; its tokenizer is a configured
copy at `model.tokenizer`. A LoRA adapter (peft, the `lora` extra) is merged into the HF weights before
bridging, so every hook site sees the adapted model.

Attention: TransformerLens 4.3 always runs its own eager re-implementation of attention (scores,
softmax, `hook_pattern`) whatever the HF config says. With `attn_implementation="sdpa"` each attention
component instead runs its HF module (`hook_in` -> HF SDPA attention -> `hook_out`, TL's own delegating
`AttentionBridge.forward`), so the hooks inside it that only TL's eager attention computes never fire
(`tracelens.model.sites.EAGER_ONLY_HOOKS`).

Call forms: the model is a `TracelensBridge`, a `TransformerBridge` that also takes HF's keyword calls, so code
written for the HF model runs unchanged: `model(**inputs)` and `model.generate(**inputs, max_new_tokens=N)` with
a tokenizer's output are the HF model's own forward and generate (hooks fire inside both), while TransformerLens'
positional forms (`model(tokens, ...)`, `model.generate(tokens, ...)`) behave exactly as in TransformerLens.
"""

from __future__ import annotations

import copy
import inspect
import itertools
import os
import types
import warnings
from importlib import metadata
from pathlib import Path

import torch
from packaging.version import Version
from transformer_lens.factories.architecture_adapter_factory import SUPPORTED_ARCHITECTURES
from transformer_lens.model_bridge import TransformerBridge
from transformer_lens.model_bridge.generalized_components.attention import AttentionBridge
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from tracelens.errors import BackendError, ConfigError, InputTypeError, MissingArtifactError
from tracelens.io import json_object, read_json

# Architectures whose hook sites are checked against HF to the bit in tracelens' own tests.
TESTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Gemma2ForCausalLM",
    "Gemma3ForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
)

# TransformerLens 4.3 reads the KV cache only from `past_key_values`; transformers 5.24 passes it as
# `cache=`, so cached generation silently runs without a cache (wrong decode logits).
_FIRST_BROKEN_TRANSFORMERS = Version("5.24")

ATTN_IMPLEMENTATIONS = ("eager", "sdpa")
"""Attention implementations `load_model` accepts; the default is "sdpa" where `sdpa_supported` says so."""

_names = itertools.count()


class TracelensBridge(TransformerBridge):
    """A `TransformerBridge` that also answers HF's keyword call forms (what `load_model` returns).

    A call with no positional input and `input_ids=` (or `inputs_embeds=`) is the HF call: `model(**inputs)`
    returns the HF model's output (`.logits` `[batch, pos, vocab]`, equal to the HF model's to the bit, positions
    as HF counts them), and `model.generate(**inputs, max_new_tokens=N)` is HF `generate`, greedy unless
    `do_sample=True`, returning token ids `[batch, prompt + new]` (left padding honoured through the attention
    mask). Tensors are moved to the model's device; `token_type_ids` the HF class does not take are dropped (a
    decoder-only model ignores them, and HF `generate` would refuse them). Every other call is TransformerLens'.
    """

    def forward(self, *args, **kwargs):
        if _is_hf_call(args, kwargs):
            return self.original_model(**self._hf_inputs(kwargs))
        return super().forward(*args, **kwargs)

    def generate(self, *args, **kwargs):
        if _is_hf_call(args, kwargs):
            return self.original_model.generate(**self._hf_inputs({"do_sample": False, **kwargs}))
        return super().generate(*args, **kwargs)

    def _hf_inputs(self, kwargs: dict) -> dict:
        """`kwargs` for the HF model: tensors on its device, `token_type_ids` dropped where its forward has none."""
        takes = inspect.signature(type(self.original_model).forward).parameters
        return {k: v.to(self.cfg.device) if isinstance(v, torch.Tensor) else v
                for k, v in kwargs.items() if k != "token_type_ids" or k in takes}


def _is_hf_call(args: tuple, kwargs: dict) -> bool:
    """HF's call form: inputs only by HF keyword (`input_ids` or `inputs_embeds`), no TransformerLens `input`."""
    return not args and "input" not in kwargs and ("input_ids" in kwargs or "inputs_embeds" in kwargs)


def require_bridge(model, what: str = "model") -> None:
    """InputTypeError, in one line, for a plain HF model where a tracelens model (`load_model`) is needed."""
    if isinstance(model, PreTrainedModel):
        raise InputTypeError(f"{what} must be a tracelens model, so wrap it with tracelens.load_model(model, tokenizer); "
                             f"got a plain {type(model).__name__}")


def load_model(
    source: str | os.PathLike | PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase | None = None,
    *,
    lora: str | os.PathLike | None = None,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    name: str | None = None,
    device_map: str | dict | None = None,
    max_memory: dict | None = None,
    attn_implementation: str | None = None,
) -> TracelensBridge:
    """Load a causal LM as a raw-mode `TransformerBridge` (a `TracelensBridge`: HF call forms too) in eval mode.

    Args:
        source: `"default"` (SmolLM2-135M-Instruct, see `tracelens.model.default_model`), a local folder
            written by `save_pretrained`, an HF model id already in the local HF cache (nothing is
            downloaded), or an in-memory `PreTrainedModel` (then `tokenizer` is required; the model
            is wrapped in place, so keep a `copy.deepcopy` if you need the untouched original).
        tokenizer: overrides the tokenizer saved with the model. It is copied, never mutated.
        lora: a peft LoRA adapter (a folder written by `save_pretrained`, or an id in the local HF
            cache) merged into the weights before bridging (`merge_lora`); needs `tracelens[lora]`.
        dtype: weights' dtype; default float32 from disk, unchanged for an in-memory model.
        device: default (or "auto") CUDA when available, else CPU; an in-memory model is moved there.
        name: a label for TransformerLens; defaults to a unique one.
        device_map, max_memory: spread a model from disk over several devices (accelerate's
            `device_map="auto"`); instead of `device`. Hook adapters, capture and generation move their
            vectors to each activation's device, so layers may live on different GPUs.
        attn_implementation: "sdpa" (torch's fused attention; the default where `sdpa_supported`) or
            "eager" (the default elsewhere, e.g. Gemma-2, whose HF class has no SDPA). Every tracelens
            site equals the HF model run with the same implementation, to the bit. Hooks on the attention
            pattern, scores or rotated queries/keys (`tracelens.model.sites.EAGER_ONLY_HOOKS`) need "eager".
            Read the result back with `attention_implementation(model)`.
    """
    _check_transformers_version()
    device = None if device == "auto" else device
    if attn_implementation is not None and attn_implementation not in ATTN_IMPLEMENTATIONS:
        raise ConfigError(f"attn_implementation must be one of {ATTN_IMPLEMENTATIONS} or None; got {attn_implementation!r}")
    hf_model, tokenizer = _hf_model(source, tokenizer, dtype, device, device_map, max_memory)
    if lora is not None:
        hf_model = merge_lora(hf_model, lora)
    if device_map is None:
        device = torch.device(device) if device is not None else _default_device()
        hf_model = hf_model.to(device)
    else:  # accelerate placed the layers; the bridge's device is where the embeddings are
        device = next(hf_model.get_input_embeddings().parameters()).device
    hf_model = hf_model.eval()
    sdpa = _wants_sdpa(attn_implementation, hf_model)
    label = name or getattr(hf_model.config, "name_or_path", None) or type(hf_model).__name__
    bridge = TransformerBridge.boot_transformers(
        f"{label}#{next(_names)}",
        hf_model=hf_model,
        tokenizer=_prepare_tokenizer(tokenizer, label),
        device=device,
        dtype=next(hf_model.parameters()).dtype,
    )
    if sdpa:  # TransformerLens forced the HF model to eager while building the bridge
        _use_sdpa(bridge)
    bridge.__class__ = TracelensBridge  # TL's builder constructs TransformerBridge itself; the subclass adds no state
    return bridge.eval()


def _hf_model(source, tokenizer, dtype, device, device_map,
              max_memory) -> tuple[PreTrainedModel, PreTrainedTokenizerBase | None]:
    """`load_model`'s HF model (an in-memory one checked and cast; else read from its folder on CPU or by
    `device_map`) and its tokenizer (the one given, else the folder's)."""
    if isinstance(source, PreTrainedModel):
        if tokenizer is None:
            raise ConfigError("load_model(model) with an in-memory model needs tokenizer=...")
        hf_model = source
        _check_architecture(type(hf_model).__name__)
        if not hf_model.config.architectures:  # e.g. loaded from a GGUF file; TransformerLens routes on it
            hf_model.config.architectures = [type(hf_model).__name__]
        if dtype is not None:
            hf_model = hf_model.to(dtype)
        if device_map is not None:
            raise ConfigError("device_map applies when loading from disk; place an in-memory model yourself")
    else:
        folder = _resolve_folder(source)
        _check_architecture(_read_architecture(folder))
        if device_map is not None and device is not None:
            raise ConfigError("pass either device or device_map, not both")
        hf_model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=dtype or torch.float32, attn_implementation="eager",  # switched after the boot
            **({"device_map": device_map, "max_memory": max_memory} if device_map is not None else {}),
        )
        if tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(folder)
    return hf_model, tokenizer


def sdpa_supported(hf_model: PreTrainedModel) -> bool:
    """Whether `load_model` can run `hf_model` with SDPA: a tested architecture whose HF class has SDPA."""
    return type(hf_model).__name__ in TESTED_ARCHITECTURES and bool(getattr(hf_model, "_supports_sdpa", False))


def attention_implementation(model: TransformerBridge) -> str:
    """The attention implementation a loaded model runs: "eager" or "sdpa" (fixed at `load_model`)."""
    return model.original_model.config._attn_implementation


def _wants_sdpa(requested: str | None, hf_model: PreTrainedModel) -> bool:
    """Whether to run SDPA: asked for (and supported, else ValueError), or by default where supported."""
    if requested is None:
        return sdpa_supported(hf_model)
    if requested == "sdpa" and not sdpa_supported(hf_model):
        raise ConfigError(
            "attn_implementation='sdpa' must be used with a tested architecture whose HF class supports SDPA; "
            f"got {type(hf_model).__name__}. Load it with attn_implementation='eager'."
        )
    return requested == "sdpa"


def _use_sdpa(bridge: TransformerBridge) -> None:
    """Run every attention component through its HF module with SDPA instead of TL's eager re-implementation."""
    bridge.original_model.set_attn_implementation("sdpa")
    for block in bridge.blocks:
        # GeneralizedComponent.__setattr__ forwards attributes to the wrapped HF module; bind on the bridge itself.
        object.__setattr__(block.attn, "forward", types.MethodType(AttentionBridge.forward, block.attn))


def merge_lora(model: PreTrainedModel, adapter: str | os.PathLike) -> PreTrainedModel:
    """`model` with the peft LoRA `adapter` (folder or local-HF-cache id) merged into its weights, in place.

    The merged weights are the base weights plus each adapter's scaled low-rank update, in the base
    dtype; what is returned is a plain `PreTrainedModel` of the same class (no peft wrapper left).
    ImportError without peft; ValueError for an adapter of another peft type.
    """
    try:
        from peft import PeftModel
    except ImportError as err:
        raise ImportError("loading a LoRA adapter needs peft: pip install 'tracelens[lora]'") from err
    folder = _resolve_folder(adapter, "LoRA adapter", "adapter_config.json")
    peft_type = _read_config(folder / "adapter_config.json").get("peft_type")
    if peft_type != "LORA":
        raise ConfigError(f"the adapter's peft_type must be LORA; got {peft_type!r} in {folder / 'adapter_config.json'}")
    return PeftModel.from_pretrained(model, folder).merge_and_unload()


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _check_transformers_version() -> None:
    installed = metadata.version("transformers")
    if Version(installed) >= _FIRST_BROKEN_TRANSFORMERS:
        raise BackendError(
            f"transformers {installed} is installed, but TransformerLens 4.3 gives "
            "silently wrong KV-cached generation with transformers >= 5.24. "
            "Install a known-good release: pip install 'transformers>=5.9,<5.24'"
        )


def _resolve_folder(source: str | os.PathLike, what: str = "model", marker: str = "config.json") -> Path:
    """A local folder holding `marker` for `source`: a path, an id in the local HF cache, or (for a model)
    "default"."""
    if what == "model" and str(source) == "default":
        from tracelens.model.default_model import default_model_path

        return default_model_path()
    saved = "HF model" if what == "model" else what
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / marker).is_file():
            raise MissingArtifactError(f"{path} is a folder but has no {marker}: not a saved {saved}")
        return path
    looked = [str(path.resolve())]
    if "/" in str(source) and not path.is_absolute() and not str(source).startswith("."):
        from huggingface_hub import constants, snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError

        try:
            cached = Path(snapshot_download(str(source), local_files_only=True))
        except (LocalEntryNotFoundError, FileNotFoundError, ValueError):
            looked.append(f"the HF cache at {constants.HF_HUB_CACHE}")
        else:
            if not (cached / marker).is_file():
                raise MissingArtifactError(f"{source!r} in the HF cache ({cached}) has no {marker}: not a saved {saved}")
            return cached
    default = ", or 'default'" if what == "model" else ""
    raise MissingArtifactError(
        f"{what} {str(source)!r} not found; looked in: {', '.join(looked)}. tracelens never downloads: "
        f"pass a folder written by save_pretrained, an id already in the HF cache{default}."
    )


def _read_config(path: Path) -> dict:
    """A model folder's JSON config file as a dict; DataError naming the file when it is not a JSON object."""
    return json_object(read_json(path, hint=""), str(path), None)


def _read_architecture(folder: Path) -> str:
    archs = _read_config(folder / "config.json").get("architectures") or []
    return archs[0] if archs else f"<no 'architectures' in {folder / 'config.json'}>"


def _check_architecture(architecture: str) -> None:
    if architecture in TESTED_ARCHITECTURES:
        return
    if architecture in SUPPORTED_ARCHITECTURES:
        warnings.warn(
            f"{architecture} loads through TransformerLens but is untested in tracelens; tested: "
            f"{', '.join(TESTED_ARCHITECTURES)}. Check hook sites against HF before trusting results.",
            stacklevel=3,
        )
        return
    raise ConfigError(
        f"unsupported architecture {architecture!r}: TransformerLens 4.3 cannot bridge it. "
        f"Tested architectures: {', '.join(TESTED_ARCHITECTURES)}."
    )


def _prepare_tokenizer(tokenizer: PreTrainedTokenizerBase, label: str) -> PreTrainedTokenizerBase:
    """A copy with the init kwargs TransformerLens reads (it mutates the tokenizer it gets)."""
    tok = copy.deepcopy(tokenizer)
    tok.init_kwargs.setdefault("name_or_path", label)
    if "add_bos_token" not in tok.init_kwargs:
        ids = tok.encode("a")
        tok.init_kwargs["add_bos_token"] = bool(
            tok.bos_token_id is not None and len(ids) > 1 and ids[0] == tok.bos_token_id
        )
    return tok
