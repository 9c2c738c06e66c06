"""The position DSL: which tokens of a prompt + response a capture or an extraction reads.

Syntax `frame[slice]`, optionally prefixed `turn[N]:`. Frames: `prompt` [0, prompt_len),
`response` [prompt_len, seq_len), `all` [0, seq_len); `system`, `thinking` and `turn[N]:...` need
turn boundaries. Slices follow Python rules inside the frame and are clamped to it:
`prompt[-1]` is the last prompt token, `response[:5]` the first five response tokens, `all[:]` all.

`TokenPositions` is the same counting inside a forward pass: each current token's position from its row's first
real token, also across KV-cached decode steps, and `mask(start, end)` the `[batch, seq]` rows x positions an
edit may touch (per-position and response-only steering both use it).
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from tracelens.errors import ConfigError, ShapeError

FRAMES = ("prompt", "response", "all", "system", "thinking")
_EXAMPLES = "examples: 'prompt[-1]', 'prompt[-3:]', 'response[:5]', 'response[:]', 'all[:]', 'turn[0]:prompt[-1]'"
_TURN = re.compile(r"^turn\[(-?\d+)\]:(.+)$")
_FRAME = re.compile(r"^(\w+)\[([^\[\]]*)\]$")
_INT = r"-?\d+"


@dataclass(frozen=True)
class Position:
    """A parsed position string: `frame`, slice bounds `start`/`stop` (None = open), optional `turn`."""

    frame: str
    start: int | None
    stop: int | None
    turn: int | None = None


def parse_position(position: str) -> Position:
    """Parse `frame[slice]`; a malformed string is a ValueError with examples."""
    if not isinstance(position, str):
        raise ConfigError(f"position must be a string like 'prompt[-1]'; got {position!r}; {_EXAMPLES}")
    text, turn = position.strip(), None
    m = _TURN.match(text)
    if m:
        turn, text = int(m[1]), m[2]
    m = _FRAME.match(text)
    if not m or m[1] not in FRAMES:
        raise ConfigError(f"malformed position {position!r}: expected frame[slice] with frame in {FRAMES}; {_EXAMPLES}")
    frame, body = m[1], m[2].strip()
    if re.fullmatch(_INT, body):
        i = int(body)
        start, stop = i, (None if i == -1 else i + 1)
    elif re.fullmatch(rf"({_INT})?:({_INT})?", body):
        a, b = body.split(":")
        start, stop = (int(a) if a else None), (int(b) if b else None)
    else:
        raise ConfigError(f"malformed slice [{body}] in position {position!r}; {_EXAMPLES}")
    return Position(frame, start, stop, turn)


def frame_bounds(pos: Position, prompt_len: int, seq_len: int,
                 turn_boundaries: dict[str, tuple[int, int]] | None = None) -> tuple[int, int]:
    """[start, end) of the frame in absolute token indices of a prompt + response sequence."""
    if pos.turn is not None or pos.frame in ("system", "thinking"):
        key = pos.frame if pos.turn is None else f"turn[{pos.turn}]:{pos.frame}"
        if not turn_boundaries or key not in turn_boundaries:
            raise ConfigError(f"position frame {key!r} needs turn_boundaries with that key; got {sorted(turn_boundaries or {})}")
        return turn_boundaries[key]
    return {"prompt": (0, prompt_len), "response": (prompt_len, seq_len), "all": (0, seq_len)}[pos.frame]


def resolve_position(position: str | Position, prompt_len: int, seq_len: int,
                     turn_boundaries: dict[str, tuple[int, int]] | None = None) -> tuple[int, int]:
    """Absolute [start, end) token indices of `position`, clamped to its frame (may be empty)."""
    pos = parse_position(position) if isinstance(position, str) else position
    lo, hi = frame_bounds(pos, prompt_len, seq_len, turn_boundaries)
    start, stop, _ = slice(pos.start, pos.stop).indices(hi - lo)
    return lo + start, lo + max(start, stop)


def tokens_needed(position: str) -> int | None:
    """Response tokens a position needs: 0 for prompt frames, N for `response[:N]`, else None."""
    pos = parse_position(position)
    if pos.frame == "prompt":
        return 0
    if pos.frame == "response" and pos.stop is not None and pos.stop > 0 and (pos.start or 0) >= 0:
        return pos.stop
    return None


def sanitize_position(position: str) -> str:
    """A directory-safe name: `response[:5]` -> `response__5`, `response[:]` -> `response_all`."""
    parse_position(position)
    name = position.replace("[:]", "_all").replace("[", "_").replace("]", "").replace(":", "_")
    return name.replace("turn_", "turn")


class TokenPositions:
    """Each current token's position counted from its row's first real token, for every forward call.

    Reads the attention mask (which generation passes for past + current tokens) and the KV cache length
    from a forward pre-hook on the HF model (`register`); without a mask, rows are unpadded and positions
    continue the KV cache.
    """

    def __init__(self, model) -> None:
        self.model = model
        self._mask: Tensor | None = None
        self._past = 0

    def register(self, stack: contextlib.ExitStack) -> None:
        """Add the pre-hook; `stack` removes it."""
        handle = self.model.original_model.register_forward_pre_hook(self._record, with_kwargs=True)
        stack.callback(handle.remove)

    def _record(self, module, args, kwargs) -> None:
        mask = kwargs.get("attention_mask")
        self._mask = mask if isinstance(mask, Tensor) and mask.dim() == 2 else None
        cache = kwargs.get("past_key_values")
        self._past = cache.get_seq_length() if cache is not None and hasattr(cache, "get_seq_length") else 0

    @property
    def continues_cache(self) -> bool:
        """True when the forward call in progress continues a KV cache (a decode step)."""
        return self._past > 0

    def current(self, batch: int, seq: int, device) -> tuple[Int[Tensor, "batch seq"], Bool[Tensor, "batch seq"]]:
        """(positions, is_real_token) for the `seq` tokens of the forward call in progress."""
        if self._mask is None:
            pos = torch.arange(self._past, self._past + seq, device=device).expand(batch, seq)
            return pos, torch.ones(batch, seq, dtype=torch.bool, device=device)
        mask = self._mask.to(device)
        if mask.shape[0] != batch or mask.shape[1] < seq:
            raise ShapeError(f"attention mask of shape {tuple(mask.shape)} does not cover a [{batch}, {seq}] activation")
        pos = mask.long().cumsum(dim=1)[:, -seq:] - 1
        return pos, mask[:, -seq:].bool()

    def mask(self, start: int | Int[Tensor, "batch"], end: int | Int[Tensor, "batch"] | None, batch: int, seq: int,
             device) -> Bool[Tensor, "batch seq"]:
        """Real tokens at positions `start <= p < end` (`end=None`: open); `start` and `end` are ints or one
        value per row."""
        pos, real = self.current(batch, seq, device)
        inside = real & (pos >= _per_row(start, batch, device))
        return inside if end is None else inside & (pos < _per_row(end, batch, device))


def _per_row(bound: int | Tensor, batch: int, device) -> int | Int[Tensor, "batch 1"]:
    """An int as is; a per-row bound as a `[batch, 1]` column (ValueError unless it has one value per row)."""
    if not isinstance(bound, Tensor):
        return bound
    if bound.shape != (batch,):
        raise ShapeError(f"a per-row position bound must have one value per row ({batch}); got shape {tuple(bound.shape)}")
    return bound.to(device)[:, None]
