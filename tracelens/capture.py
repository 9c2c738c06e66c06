"""`capture_at_position`: prefill-only capture of prompts at a position-DSL slice, pooled."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from tracelens.hooks import MultiLayerCapture
from tracelens.positions import parse_position, resolve_position
from tracelens.prompts import format_prompt, tokenize_batch

POOLS = ("mean", "first", "last", "none")


def capture_at_position(
    model,
    tokenizer,
    prompts: Sequence[str],
    layers: int | Sequence[int],
    position: str = "prompt[-1]",
    pool: str = "mean",
    pre_formatted: bool = False,
    component: str = "residual",
    batch_size: int | None = None,
) -> Tensor | list[Tensor]:
    """Activations of `prompts` at `position` (frames `prompt` and `all`; no response exists), as float32 on CPU.

    Shapes: `layers=int` -> `[n_prompts, d]`; a list -> `[n_prompts, n_layers, d]`. With `pool="none"`
    a list with one tensor per prompt: `[n_tokens, d]` (int layers) or `[n_layers, n_tokens, d]`.
    Prompts go through `format_prompt` unless `pre_formatted`. Batches are left-padded (default 8
    prompts); results equal one-prompt-at-a-time capture. An empty slice raises with the prompt index.
    """
    if pool not in POOLS:
        raise ValueError(f"unknown pool {pool!r}; use one of {POOLS}")
    if parse_position(position).frame == "response":
        raise ValueError(f"position {position!r} reads the response, but capture_at_position is prefill-only; "
                         "use a 'prompt[...]' or 'all[...]' position")
    if isinstance(prompts, str) or not prompts:
        raise ValueError("prompts must be a non-empty list of strings")
    squeeze = isinstance(layers, int)
    layer_list = [layers] if squeeze else list(layers)
    texts = list(prompts) if pre_formatted else [format_prompt(tokenizer, p) for p in prompts]
    batch_size = batch_size or 8
    out: list[Tensor] = []
    for start in tqdm(range(0, len(texts), batch_size), desc="capture", disable=len(texts) <= batch_size):
        ids, mask = tokenize_batch(tokenizer, texts[start : start + batch_size])
        device = model.cfg.device
        with MultiLayerCapture(model, layer_list, component, keep_on_gpu=True) as cap, torch.inference_mode():
            model(ids.to(device), attention_mask=mask.to(device))
        acts = torch.stack([cap.get(l) for l in layer_list], dim=1)  # [batch, n_layers, pos, d]
        for row in range(ids.shape[0]):
            n = int(mask[row].sum())
            s, e = resolve_position(position, n, n)
            if e <= s:
                raise ValueError(f"position {position!r} selects no tokens of prompt {start + row} ({n} tokens)")
            pad = ids.shape[1] - n
            out.append(_pool(acts[row, :, pad + s : pad + e].float().cpu(), pool))
    if pool == "none":
        return [a[0] for a in out] if squeeze else out
    stacked = torch.stack(out)
    return stacked[:, 0] if squeeze else stacked


def _pool(acts: Tensor, pool: str) -> Tensor:
    """`[n_layers, n_tokens, d]` -> `[n_layers, d]` (or unchanged for "none")."""
    if pool == "mean":
        return acts.mean(dim=1)
    if pool == "first":
        return acts[:, 0]
    if pool == "last":
        return acts[:, -1]
    return acts
