"""`capture_at_position`: prefill-only capture of prompts at a position-DSL slice, pooled."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from tracelens.errors import ConfigError, ShapeError
from tracelens.model.hooks import MultiLayerCapture
from tracelens.model.positions import parse_position, resolve_position
from tracelens.model.prompts import encode, format_prompt, left_pad

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
    *,
    return_mask: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Activations of `prompts` at `position` (frames `prompt` and `all`; no response exists), as float32 on CPU.

    Shapes: `layers=int` -> `[n_prompts, d]`; a list -> `[n_prompts, n_layers, d]`. With `pool="none"` every
    token of the slice: `[n_prompts, seq, d]` (int layers) or `[n_prompts, n_layers, seq, d]`, `seq` the longest
    slice; shorter slices are zero-padded at the end, and `return_mask=True` (only with `pool="none"`) returns
    `(acts, mask)` with `mask` `[n_prompts, seq]` True at real tokens. Prompts go through `format_prompt` unless
    `pre_formatted`. Batches are left-padded (default 8 prompts); results equal one-prompt-at-a-time capture.
    An empty slice raises with the prompt index.
    """
    if parse_position(position).frame == "response":
        raise ConfigError(f"position {position!r} reads the response, but capture_at_position is prefill-only; "
                         "use a 'prompt[...]' or 'all[...]' position")
    if isinstance(prompts, str) or not prompts:
        raise ConfigError("prompts must be a non-empty list of strings")
    if return_mask and pool != "none":
        raise ConfigError(f"return_mask must be used with pool='none' (pooled rows have no padding); got pool={pool!r}")
    squeeze = isinstance(layers, int)
    layer_list = [layers] if squeeze else list(layers)
    texts = list(prompts) if pre_formatted else [format_prompt(tokenizer, p) for p in prompts]
    rows = [encode(tokenizer, t) for t in texts]
    out = capture_sequences(model, rows, [len(r) for r in rows], layer_list, position, pool, component, batch_size)
    if pool == "none":
        lengths = torch.tensor([a.shape[1] for a in out])
        width = int(lengths.max())
        out = torch.stack([F.pad(a, (0, 0, 0, width - a.shape[1])) for a in out])  # [n, n_layers, seq, d]
    out = out[:, 0] if squeeze else out
    return (out, torch.arange(width)[None, :] < lengths[:, None]) if return_mask else out


def capture_sequences(
    model,
    rows: Sequence[Sequence[int]],
    prompt_lens: Sequence[int],
    layers: Sequence[int],
    position: str,
    pool: str = "mean",
    component: str = "residual",
    batch_size: int | None = None,
) -> Tensor | list[Tensor]:
    """Pooled activations of token sequences (prompt + response ids) at `position`, float32 on CPU.

    `prompt_lens[i]` splits row i into its prompt and response frames. Returns `[n, n_layers, d]`, or
    for `pool="none"` a list of `[n_layers, n_tokens, d]`. Rows are left-padded in batches of
    `batch_size` (default 8); an empty slice raises with the row index.
    """
    if pool not in POOLS:
        raise ConfigError(f"unknown pool {pool!r}; use one of {POOLS}")
    if len(rows) != len(prompt_lens):
        raise ShapeError(f"got {len(rows)} rows but {len(prompt_lens)} prompt lengths")
    batch_size = batch_size or 8
    pad_id = getattr(model.tokenizer, "pad_token_id", None) or 0
    out: list[Tensor] = []
    for start in tqdm(range(0, len(rows), batch_size), desc="capture", disable=len(rows) <= batch_size):
        chunk = rows[start : start + batch_size]
        ids, mask = left_pad(chunk, pad_id)
        width = ids.shape[1]
        device = model.cfg.device
        with MultiLayerCapture(model, layers, component, keep_on_gpu=True) as cap, torch.inference_mode():
            model(ids.to(device), attention_mask=mask.to(device))
        acts = torch.stack([cap.get(l) for l in layers], dim=1)  # [batch, n_layers, pos, d]
        for i, r in enumerate(chunk):
            s, e = resolve_position(position, prompt_lens[start + i], len(r))
            if e <= s:
                raise ConfigError(f"position {position!r} selects no tokens of prompt {start + i} ({len(r)} tokens)")
            pad = width - len(r)
            out.append(_pool(acts[i, :, pad + s : pad + e].float().cpu(), pool))
    return out if pool == "none" else torch.stack(out)


def _pool(acts: Tensor, pool: str) -> Tensor:
    """`[n_layers, n_tokens, d]` -> `[n_layers, d]` (or unchanged for "none")."""
    if pool == "mean":
        return acts.mean(dim=1)
    if pool == "first":
        return acts[:, 0]
    if pool == "last":
        return acts[:, -1]
    return acts
