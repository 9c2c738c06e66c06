"""The position DSL: which tokens of a prompt + response a capture or an extraction reads.

Syntax `frame[slice]`, optionally prefixed `turn[N]:`. Frames: `prompt` [0, prompt_len),
`response` [prompt_len, seq_len), `all` [0, seq_len); `system`, `thinking` and `turn[N]:...` need
turn boundaries. Slices follow Python rules inside the frame and are clamped to it:
`prompt[-1]` is the last prompt token, `response[:5]` the first five response tokens, `all[:]` all.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

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
        raise ValueError(f"position must be a string like 'prompt[-1]', got {position!r}; {_EXAMPLES}")
    text, turn = position.strip(), None
    m = _TURN.match(text)
    if m:
        turn, text = int(m[1]), m[2]
    m = _FRAME.match(text)
    if not m or m[1] not in FRAMES:
        raise ValueError(f"malformed position {position!r}: expected frame[slice] with frame in {FRAMES}; {_EXAMPLES}")
    frame, body = m[1], m[2].strip()
    if re.fullmatch(_INT, body):
        i = int(body)
        start, stop = i, (None if i == -1 else i + 1)
    elif re.fullmatch(rf"({_INT})?:({_INT})?", body):
        a, b = body.split(":")
        start, stop = (int(a) if a else None), (int(b) if b else None)
    else:
        raise ValueError(f"malformed slice [{body}] in position {position!r}; {_EXAMPLES}")
    return Position(frame, start, stop, turn)


def frame_bounds(pos: Position, prompt_len: int, seq_len: int,
                 turn_boundaries: dict[str, tuple[int, int]] | None = None) -> tuple[int, int]:
    """[start, end) of the frame in absolute token indices of a prompt + response sequence."""
    if pos.turn is not None or pos.frame in ("system", "thinking"):
        key = pos.frame if pos.turn is None else f"turn[{pos.turn}]:{pos.frame}"
        if not turn_boundaries or key not in turn_boundaries:
            raise ValueError(f"position frame {key!r} needs turn_boundaries with that key; got {sorted(turn_boundaries or {})}")
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
