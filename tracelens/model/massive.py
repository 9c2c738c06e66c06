"""Massive activations: a few residual dimensions 100-1000x the median (Sun et al. 2024) that act as
fixed biases in projections. Calibrate which they are here; `tracelens.model.cleaning.clean_scores` then removes
their share from projections.

`MassiveDimStats` keeps the running sums of a calibration from residuals it is given (`observe`), which any
backend can supply; `MassiveDimCollector` calibrates passively: a read adapter (`tracelens.model.hooks`) on every layer's residual
reads prefill passes only (decode steps, seq len 1, are ignored) and real tokens only, until
`target_tokens` tokens are seen, then stops; `finalize()` removes the hooks and writes `calibration.json`,
with running sums under `_state` so an interrupted calibration resumes. Being a read, it sees the residual
after any steering at the same layer.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from jaxtyping import Float
from torch import Tensor

from tracelens.model.cleaning import CLEAN_MODES
from tracelens.errors import ConfigError
from tracelens.model.hooks import READ, HookAdapter
from tracelens.io import read_json, write_json
from tracelens.model.positions import TokenPositions
from tracelens.model.sites import get_hook_path


class MassiveDimStats:
    """Running sums of a massive-dim calibration over `n_layers` x `d` residuals: `observe` adds one prompt's
    activations, `finalize` writes `calibration.json` (nothing under 100 tokens); a file at `path` is resumed."""

    def __init__(self, n_layers: int, d: int, path: Path, target_tokens: int = 5000, top_k: int = 5,
                 info: dict | None = None) -> None:
        self.path, self.target_tokens, self.top_k = Path(path), target_tokens, top_k
        self.info = info or {}
        self.n_layers = n_layers
        self.sums = torch.zeros(n_layers, d, dtype=torch.float64)
        self.unit_sums = torch.zeros(n_layers, d, dtype=torch.float64)
        self.norm_sums = torch.zeros(n_layers, dtype=torch.float64)
        self.tokens_seen, self.n_prompts = 0, 0
        if self.path.is_file():
            self._resume(read_json(self.path))

    def _resume(self, saved: dict) -> None:
        state = saved.get("_state") or {}
        if state:
            self.sums = torch.tensor(state["sums"], dtype=torch.float64)
            self.unit_sums = torch.tensor(state["unit_sums"], dtype=torch.float64)
            self.norm_sums = torch.tensor(state["norm_sums"], dtype=torch.float64)
            self.tokens_seen, self.n_prompts = int(state["tokens_seen"]), int(state["n_prompts"])

    def should_skip(self) -> bool:
        return self.tokens_seen >= self.target_tokens

    def observe(self, residuals: dict[int, Float[Tensor, "n d"]], n_prompts: int = 1) -> None:
        """Add the residuals of every layer (`{layer: [n_real_tokens, d]}`, one pass over `n_prompts` prompts);
        ignored once `target_tokens` are seen. ConfigError unless every layer is there."""
        if self.should_skip():
            return
        if sorted(residuals) != list(range(self.n_layers)):
            raise ConfigError(f"a calibration pass needs the residual of every layer 0..{self.n_layers - 1}; "
                              f"got layers {sorted(residuals)}")
        for layer in range(self.n_layers):
            self._add(layer, residuals[layer], n_prompts)

    def _add(self, layer: int, act: Tensor, n_prompts: int) -> None:
        h = act.detach().double().cpu()  # [n_real, d]
        self.sums[layer] += h.sum(0)
        norms = h.norm(dim=-1)
        self.norm_sums[layer] += norms.sum()
        self.unit_sums[layer] += (h / norms.clamp(min=1e-12)[:, None]).sum(0)
        if layer == self.n_layers - 1:  # count once per pass, after every layer has seen it
            self.tokens_seen += h.shape[0]
            self.n_prompts += n_prompts

    def finalize(self) -> dict | None:
        """Write the calibration file; None (nothing written) under 100 tokens."""
        if self.tokens_seen < 100:
            return None
        report = {**self.info, "prompt_set": self.info.get("prompt_set", "calibration"),
                  "is_calibration": True, "source": self.info.get("source", "inference_passive"),
                  "aggregate": aggregate(self.sums, self.unit_sums, self.norm_sums, self.tokens_seen, self.n_prompts,
                                         self.top_k),
                  "_state": {"sums": self.sums.tolist(), "unit_sums": self.unit_sums.tolist(),
                             "norm_sums": self.norm_sums.tolist(), "tokens_seen": self.tokens_seen,
                             "n_prompts": self.n_prompts}}
        write_json(self.path, report)
        return report


class MassiveDimCollector(HookAdapter, MassiveDimStats):
    """Passive calibration of massive dims over prefill passes (see the module docstring); `register()` /
    `finalize()` or a `with` block add and remove its hooks."""

    phase = READ

    def __init__(self, model, path: Path, target_tokens: int = 5000, top_k: int = 5, info: dict | None = None) -> None:
        HookAdapter.__init__(self, model)
        MassiveDimStats.__init__(self, model.cfg.n_layers, model.cfg.d_model, path, target_tokens, top_k, info)
        self.positions = TokenPositions(model)

    def register(self) -> None:
        """Add the hooks (idempotent; nothing is added once the budget is reached)."""
        if not self.active and not self.should_skip():
            self.__enter__()

    def _hooks(self):
        return [(get_hook_path(l, "residual"), functools.partial(self._collect, l)) for l in range(self.model.cfg.n_layers)]

    def _collect(self, layer: int, act: Tensor, hook) -> None:
        if act.shape[1] <= 1 or self.tokens_seen >= self.target_tokens:
            return  # decode steps carry no new prompt tokens; stop once calibrated
        _, real = self.positions.current(act.shape[0], act.shape[1], act.device)
        self._add(layer, act[real], act.shape[0])

    def finalize(self) -> dict | None:
        """Remove the hooks and write the calibration file; None (nothing written) under 100 tokens."""
        if self.active:
            self.__exit__(None, None, None)
        return MassiveDimStats.finalize(self)


def aggregate(sums: Tensor, unit_sums: Tensor, norm_sums: Tensor, tokens: int, n_prompts: int, top_k: int) -> dict:
    """The calibration summary from running sums over `tokens` tokens (`[n_layers, d]` sums)."""
    mean = sums / tokens  # mean activation per layer [L, d]
    abs_mean = mean.abs()
    top = abs_mean.topk(top_k, dim=1).indices  # [L, k]
    dims = sorted({int(d) for d in top.flatten()})
    scale = abs_mean.mean(dim=1, keepdim=True).clamp(min=1e-12)
    direction = mean / mean.norm(dim=1, keepdim=True).clamp(min=1e-12)
    alignment = (unit_sums / tokens * direction).sum(dim=1)  # mean token cosine to the mean direction
    consecutive = torch.nn.functional.cosine_similarity(mean[1:], mean[:-1], dim=1)
    return {
        "n_prompts": n_prompts,
        "tokens_seen": tokens,
        "mean_alignment_by_layer": [round(float(a), 4) for a in alignment],
        "top_dims_by_layer": {str(l): [int(d) for d in top[l]] for l in range(len(top))},
        "dim_magnitude_by_layer": {str(d): [round(float(x), 2) for x in (abs_mean[:, d:d + 1] / scale)[:, 0]]
                                   for d in dims},
        "layer_norms": [round(float(n / tokens), 3) for n in norm_sums],
        "consecutive_cosine": [round(float(c), 4) for c in consecutive],
    }


def candidate_dims(calibration: dict, mode: str) -> list[int]:
    """Dims to clean: "top5-3layers" = in some layer's top 5 at 3 or more layers; "all" = every top dim."""
    if mode not in CLEAN_MODES:
        raise ConfigError(f"unknown clean mode {mode!r}; use one of {list(CLEAN_MODES)}")
    if mode == "none":
        return []
    counts: dict[int, int] = {}
    for dims in calibration["aggregate"]["top_dims_by_layer"].values():
        for d in dims[:5]:
            counts[int(d)] = counts.get(int(d), 0) + 1
    if mode == "all":
        return sorted(counts)
    return sorted(d for d, c in counts.items() if c >= 3)
