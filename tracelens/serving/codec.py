"""The model server's wire format, shared by the server and `tracelens.serving.client`: tensors, activations,
results and tokens to JSON and back, and the request types as the JSON the server parses
(`tracelens.serving.parsing`). No pickle anywhere.

A tensor is ``{"safetensors": base64}`` (one tensor under the key ``"t"``) or, for ``input_ids`` /
``attention_mask`` and steering vectors, a plain nested JSON list of numbers. An activation blob
``{layer: {component: tensor}}`` is ``{"safetensors": base64}`` of one safetensors file with keys
``"{layer}/{component}"``. A malformed tensor is a ConfigError naming ``what`` ("vector must be ...; got ...").
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from tracelens.errors import ConfigError
from tracelens.model.requests import CaptureResult, CaptureSpec, GenerationConfig, SteeringSpec, TokenOutput


def encode_tensor(t: torch.Tensor) -> dict:
    return {"safetensors": base64.b64encode(st_save({"t": t.detach().contiguous().cpu()})).decode("ascii")}


def _safetensors_blob(obj, what: str) -> dict[str, torch.Tensor]:
    if not isinstance(obj, dict) or set(obj) != {"safetensors"} or not isinstance(obj["safetensors"], str):
        raise ConfigError(f"{what} must be {{\"safetensors\": base64 string}} or a JSON list; got {str(obj)[:80]}")
    try:
        return st_load(base64.b64decode(obj["safetensors"], validate=True))
    except (binascii.Error, ValueError, SafetensorError) as err:
        raise ConfigError(f"{what} must be a base64 safetensors blob; got one that does not decode ({err})") from None


def decode_tensor(obj, what: str = "tensor", dtype: torch.dtype | None = None) -> torch.Tensor:
    """A tensor from ``{"safetensors": b64}`` or a nested list of numbers; ConfigError if malformed."""
    if isinstance(obj, list):
        try:
            return torch.tensor(obj, dtype=dtype)
        except (TypeError, ValueError, RuntimeError, OverflowError) as err:
            raise ConfigError(f"{what} must be a rectangular list of numbers; got one that is not ({err})") from None
    tensors = _safetensors_blob(obj, what)
    if set(tensors) != {"t"}:
        raise ConfigError(f"{what} must be a safetensors blob of one tensor named 't'; got {sorted(tensors)}")
    return tensors["t"] if dtype is None else tensors["t"].to(dtype)


def encode_activations(acts: dict[int, dict[str, torch.Tensor]]) -> dict:
    """One safetensors blob; components that are one tensor (Llama's attn_out and attn_contribution) are copied,
    as safetensors refuses shared memory."""
    flat = {f"{l}/{c}": a.detach().cpu().clone() for l, comps in acts.items() for c, a in comps.items()}
    return {"safetensors": base64.b64encode(st_save(flat)).decode("ascii")}


def decode_activations(obj) -> dict[int, dict[str, torch.Tensor]]:
    out: dict[int, dict[str, torch.Tensor]] = {}
    for key, t in _safetensors_blob(obj, "activations").items():
        layer, _, comp = key.partition("/")
        out.setdefault(int(layer), {})[comp] = t
    return {l: out[l] for l in sorted(out)}


def result_to_json(r: CaptureResult, activations: bool = True) -> dict:
    out = {
        "prompt_text": r.prompt_text, "response_text": r.response_text,
        "prompt_tokens": list(r.prompt_tokens), "response_tokens": list(r.response_tokens),
        "prompt_token_ids": list(r.prompt_token_ids), "response_token_ids": list(r.response_token_ids),
    }
    if activations:
        out["prompt_activations"] = encode_activations(r.prompt_activations)
        out["response_activations"] = encode_activations(r.response_activations)
    return out


def result_from_json(d: dict) -> CaptureResult:
    return CaptureResult(
        d["prompt_text"], d["response_text"], d["prompt_tokens"], d["response_tokens"],
        d["prompt_token_ids"], d["response_token_ids"],
        decode_activations(d["prompt_activations"]) if "prompt_activations" in d else {},
        decode_activations(d["response_activations"]) if "response_activations" in d else {},
    )


def token_to_json(t: TokenOutput) -> dict:
    return {"token": t.token, "token_id": t.token_id, "step": t.step, "activations": encode_activations(t.activations)}


def token_from_json(d: dict) -> TokenOutput:
    return TokenOutput(token=d["token"], token_id=d["token_id"], step=d["step"],
                       activations=decode_activations(d["activations"]))


def config_to_json(c: GenerationConfig | None) -> dict | None:
    return None if c is None else {"max_new_tokens": c.max_new_tokens, "temperature": c.temperature,
                                   "stop_token_ids": c.stop_token_ids, "seed": c.seed}


def capture_to_json(c: CaptureSpec | None) -> dict | None:
    return None if c is None else {"layers": c.layers, "components": list(c.components)}


def steering_to_json(steering: Sequence[SteeringSpec] | None) -> list[dict] | None:
    """The specs as the server's steering entries; ConfigError for a condition, which the wire does not carry."""
    if not steering:
        return None
    for i, s in enumerate(steering):
        if s.condition is not None:
            raise ConfigError(f"steering[{i}] must have no condition to go to the model server; got a condition")
    return [{"layer": s.layer, "vector": encode_tensor(s.vector), "coefficient": s.coefficient,
             "component": s.component, "positions": s.positions, **({} if s.rows is None else {"rows": list(s.rows)})}
            for s in steering]
