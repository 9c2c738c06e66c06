"""The request vocabulary: what to generate, steer and capture, and what comes back. One definition each.

`HookedGenerator`, the hook adapters, `LocalBackend`, `VLLMBackend`, `RemoteBackend` and the model server all take
these types; the server builds them from JSON, so its 400 messages are these messages. Each request type checks
itself at construction and raises a `tracelens.errors` class with one message style, "X must be Y; got Z"
(ConfigError for a bad value, InputTypeError for a wrong type, ShapeError / DirectionError for a bad vector).
The rules of a call are here too, one function each: `check_steering_request` (each entry a `SteeringSpec`, its
rows inside the call's prompts: `check_rows_within`, and the backend's model facts), which `LocalBackend`,
`TLVLLMBackend`, `HookedGenerator` and the server's parser call; the model facts `check_width` and
`check_condition_layer` (layers: `tracelens.model.sites.resolve_layer`), which
`tracelens.model.generation.check_steering` applies for a tracelens model and `TLVLLMBackend` for its driver.

The seed's two spellings are one class each: `SteeringConfig is SteeringSpec`, `CaptureConfig is CaptureSpec`,
`TokenResult is TokenOutput`. `SteeringSpec`'s fields are keyword-only (the seed wrote
`SteeringConfig(vector=..., layer=...)` and `SteeringSpec(layer=..., vector=...)`, two positional orders), as are
`TokenOutput`'s (`token_id` first for the generator, `token` first for the backends).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from jaxtyping import Float
from torch import Tensor

from tracelens.errors import ConfigError, DirectionError, InputTypeError, ShapeError
from tracelens.model.edits import as_vector, finite_float
from tracelens.model.positions import parse_position
from tracelens.model.sites import COMPONENTS, resolve_layer

POSITIONS = ("all", "response")
"""Where a `SteeringSpec` steers: every position, or the last prompt position and every generated token."""
COMPARATORS = ("greater", "less")
"""How a `Condition` compares a prompt's score with its threshold."""
MAX_SEED = 2**64
"""Seeds are integers in [0, MAX_SEED) (torch's generator range)."""


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_int(value, what: str) -> int:
    """`value` unchanged when it is an int (not a bool); InputTypeError otherwise."""
    if not _is_int(value):
        raise InputTypeError(f"{what} must be an integer; got {type(value).__name__} {value!r}")
    return value


def check_max_new_tokens(max_new_tokens: int) -> int:
    """`max_new_tokens` unchanged; ConfigError unless it is an int (not a bool) >= 1."""
    if not _is_int(max_new_tokens) or max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be an integer >= 1; got {max_new_tokens!r}")
    return max_new_tokens


def check_temperature(temperature: float) -> float:
    """`temperature` as a float; ConfigError when it is NaN, infinite or negative (0 means greedy)."""
    t = finite_float(temperature, "temperature")
    if t < 0:
        raise ConfigError(f"temperature must be >= 0; got {t}")
    return t


def check_rows(rows) -> tuple[int, int]:
    """`rows` as a `(start, end)` pair of ints with 0 <= start < end; ConfigError otherwise."""
    ok = isinstance(rows, (tuple, list)) and len(rows) == 2 and all(_is_int(r) for r in rows) and 0 <= rows[0] < rows[1]
    if not ok:
        raise ConfigError(f"rows must be (start, end) integers with 0 <= start < end; got {rows!r}")
    return int(rows[0]), int(rows[1])


@contextlib.contextmanager
def field_errors(what: str) -> Iterator[None]:
    """Re-raise a validation error (ConfigError, ShapeError, DirectionError, InputTypeError) from inside with the
    field it concerns in front, same class: "steering[0]: layer 9 is out of range for a model with 2 layers ..."."""
    try:
        yield
    except (ConfigError, ShapeError, DirectionError, InputTypeError) as err:
        raise type(err)(f"{what}: {err}") from None


def _check_component(component, what: str = "component") -> str:
    if component not in COMPONENTS:
        raise ConfigError(f"{what} must be one of {', '.join(COMPONENTS)}; got {component!r}")
    return component


# --- requests ---------------------------------------------------------------------------------------------------


@dataclass
class GenerationConfig:
    """How to generate: `max_new_tokens` (an int >= 1), `temperature` (finite, >= 0; 0 is greedy), extra
    `stop_token_ids` (ints >= 0; the model's EOS ids always stop) and `seed` (an int in [0, 2**64) or None)
    for reproducible sampling."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    stop_token_ids: list[int] | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        check_max_new_tokens(self.max_new_tokens)
        self.temperature = check_temperature(self.temperature)
        if self.stop_token_ids is not None:
            ids = self.stop_token_ids
            if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence) or not all(
                    _is_int(i) and i >= 0 for i in ids):
                raise ConfigError(f"stop_token_ids must be None or a list of integers >= 0; got {ids!r}")
            self.stop_token_ids = list(ids)
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed < MAX_SEED):
            raise ConfigError(f"seed must be None or an integer in [0, 2**64); got {self.seed!r}")


@dataclass(frozen=True)
class Condition:
    """The condition of a conditional `SteeringSpec`: steer a row only when its prompt's projection on
    unit(`vector`) at `layer`, read at `position` (a `prompt[...]` position), is above ("greater") or below
    ("less") `threshold`; decided once per sequence at the prompt (see `ConditionalSteering`)."""

    vector: Float[Tensor, "d"]
    layer: int
    threshold: float
    comparator: str = "greater"
    position: str = "prompt[-1]"

    def __post_init__(self) -> None:
        object.__setattr__(self, "vector", as_vector(self.vector, "condition vector"))
        check_int(self.layer, "condition layer")
        object.__setattr__(self, "threshold", finite_float(self.threshold, "threshold"))
        if self.comparator not in COMPARATORS:
            raise ConfigError(f"comparator must be one of {', '.join(COMPARATORS)}; got {self.comparator!r}")
        if parse_position(self.position).frame != "prompt":
            raise ConfigError(f"the condition is read from the prompt: position must be a 'prompt[...]' position; "
                              f"got {self.position!r}")


@dataclass(kw_only=True)
class SteeringSpec:
    """Add `coefficient * vector` at `component` of `layer` (negative layers count from the end).

    `positions`: "all" (every position of the prompt and of each generated token) or "response" (from the last
    prompt position on: every generated token). `rows=(start, end)` steers only prompts `start..end-1` of the
    call (per-prompt steering in one batch); None steers every prompt. `condition` (CAST) steers only the rows
    whose prompt passes it, at every position (so `positions` must be "all" and `rows` None). The vector is
    kept as float32, not normalised (with a unit vector the coefficient is in residual-norm units).
    `SteeringConfig` is this class.
    """

    layer: int
    vector: Float[Tensor, "d"]
    coefficient: float = 1.0
    component: str = "residual"
    positions: str = "all"
    condition: Condition | None = None
    rows: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        check_int(self.layer, "layer")
        self.vector = as_vector(self.vector, "vector")
        self.coefficient = finite_float(self.coefficient, "coefficient")
        _check_component(self.component)
        if self.positions not in POSITIONS:
            raise ConfigError(f"positions must be one of {', '.join(POSITIONS)}; got {self.positions!r}")
        if self.condition is not None and not isinstance(self.condition, Condition):
            raise InputTypeError(f"condition must be a Condition or None; got {type(self.condition).__name__}")
        if self.rows is not None:
            self.rows = check_rows(self.rows)
        if self.condition is not None and self.positions != "all":
            raise ConfigError(f"conditional steering covers every position: positions must be 'all'; "
                              f"got {self.positions!r}")
        if self.condition is not None and self.rows is not None:
            raise ConfigError(f"conditional steering picks its own rows: rows must be None; got {self.rows} "
                              "with a condition")

    @classmethod
    def from_tuple(cls, entry, component: str = "residual", what: str = "steering entry") -> "SteeringSpec":
        """The seed's tuple forms as a spec: `(layer, vector, coefficient)`, with a 4th item that is either a
        component name (`MultiLayerSteering`) or a `(b_start, b_end)` batch slice (`PerSampleSteering`);
        `component` applies when the tuple names none. A spec is returned as is."""
        if isinstance(entry, cls):
            return entry
        if not isinstance(entry, (tuple, list)) or len(entry) not in (3, 4):
            raise ConfigError(f"{what} must be a SteeringSpec or (layer, vector, coefficient[, component or "
                              f"(b_start, b_end)]); got {entry!r:.80}")
        layer, vector, coefficient, *extra = entry
        rows = None
        if extra and isinstance(extra[0], str):
            component = extra[0]
        elif extra:
            rows = extra[0]
        with field_errors(what):
            return cls(layer=layer, vector=vector, coefficient=coefficient, component=component, rows=rows)


SteeringConfig = SteeringSpec
"""The seed's name for `SteeringSpec` (`tracelens.model.generation.SteeringConfig`): the same class."""


# --- the checks of a call (one function per rule) -----------------------------------------------------------


def check_rows_within(rows: tuple[int, int] | None, n_prompts: int) -> None:
    """Steering rows lie within the call's prompts: `rows` is None or ends at most at `n_prompts` (ConfigError)."""
    if rows is not None and rows[1] > n_prompts:
        raise ConfigError(f"rows must lie within the {n_prompts} prompts; got {rows}")


def check_width(vector: Tensor, width: int | None, site: str, what: str = "vector") -> None:
    """A vector has the width of the site it acts at (`width` None: not known, not checked); ShapeError otherwise."""
    if width is not None and vector.shape[0] != width:
        raise ShapeError(f"{what} has {vector.shape[0]} elements but {site} has width {width}: "
                         "the vector is probably from another model or site")


def check_condition_layer(layer: int, condition_layer: int, n_layers: int) -> None:
    """Conditional steering steers at or after the layer it decides at (ConfigError otherwise)."""
    if resolve_layer(layer, n_layers) < resolve_layer(condition_layer, n_layers):
        raise ConfigError(f"steering layer {layer} runs before condition layer {condition_layer} in the prompt's "
                          "forward pass, before the decision exists; use a steering layer >= the condition layer")


def check_steering_request(steering: Sequence[SteeringSpec] | None, n_prompts: int,
                           check: Callable[[SteeringSpec], None] | None = None) -> list[SteeringSpec]:
    """`steering` (None: none) as a list, checked for a call over `n_prompts` prompts: each entry a `SteeringSpec`
    (InputTypeError), its rows within the prompts (`check_rows_within`) and passing `check` (the backend's model
    facts), each error naming its entry: "steering[1]: ...". The specs' own rules (their vectors, positions, ...)
    were checked once, when they were built."""
    specs = list(steering or ())
    for i, spec in enumerate(specs):
        if not isinstance(spec, SteeringSpec):
            raise InputTypeError(f"steering[{i}] must be a SteeringSpec; got {type(spec).__name__}")
        with field_errors(f"steering[{i}]"):
            check_rows_within(spec.rows, n_prompts)
            if check is not None:
                check(spec)
    return specs


def check_every_position(steering: Sequence[SteeringSpec] | None) -> None:
    """Teacher-forced scoring steers every position of every row: positions "all", no rows, no condition."""
    for spec in steering or ():
        if spec.positions != "all" or spec.rows is not None or spec.condition is not None:
            raise ConfigError("response_logprobs steers every position of every row: steering must have positions 'all', no "
                              f"rows and no condition; got {spec.positions!r}, rows={spec.rows}, "
                              f"condition={spec.condition}")


@dataclass
class CaptureSpec:
    """What to record: `layers` (None: every layer; negative ones count from the end) x `components` (names
    from `tracelens.model.sites.COMPONENTS`). `CaptureConfig` is this class."""

    layers: Sequence[int] | None = None
    components: Sequence[str] = ("residual",)

    def __post_init__(self) -> None:
        if self.layers is not None:
            if isinstance(self.layers, (str, bytes)) or not isinstance(self.layers, Sequence) or not all(
                    _is_int(layer) for layer in self.layers):
                raise ConfigError(f"layers must be None (every layer) or a list of integers; got {self.layers!r}")
            self.layers = list(self.layers)
        comps = self.components
        if isinstance(comps, (str, bytes)) or not isinstance(comps, Sequence) or not comps:
            raise ConfigError(f"components must be a non-empty list of component names; got {comps!r}")
        self.components = tuple(_check_component(c, "each component") for c in comps)


CaptureConfig = CaptureSpec
"""The seed's name for `CaptureSpec` (`tracelens.model.generation.CaptureConfig`): the same class."""


# --- results ----------------------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class TokenOutput:
    """One generated token, as it is produced: `token_id`, `step` (0 for the first token), `activations` at
    the position that produced it (`activations[layer][component]` `[d]`), the step's `logits` `[d_vocab]`
    (the generator's; None from a backend) and `token`, its text (backends decode it; None from the
    generator). `TokenResult` is this class."""

    token_id: int
    step: int
    activations: dict[int, dict[str, Tensor]] = field(default_factory=dict)
    logits: Float[Tensor, "d_vocab"] | None = None
    token: str | None = None


TokenResult = TokenOutput
"""The seed's backend name for `TokenOutput` (`tracelens.serving.backends.TokenResult`): the same class."""


@dataclass
class SequenceOutput:
    """One row of `HookedGenerator.generate`: `token_ids` (ending at the stop token when one was produced),
    `activations[layer][component]` `[n_tokens, d]` where row k is the position that produced token k (the
    last prompt position for token 0), and `logits` `[n_tokens, d_vocab]` when asked."""

    token_ids: list[int]
    activations: dict[int, dict[str, Tensor]] = field(default_factory=dict)
    logits: Tensor | None = None


@dataclass
class CaptureResult:
    """One prompt's generation from a backend, with activations at every prompt and response token position:
    `prompt_activations[layer][component]` `[n_prompt_tokens, d]`, likewise for the response (row k is response
    token k itself, read by a teacher-forced forward; `SequenceOutput` pairs token k with the position before it).

    With `top_logprobs=k` asked: `response_logprobs[i]` is the natural-log probability of response token i under
    the model's next-token distribution (temperature 1, before sampling), and `response_top_logprobs[i]` the `k`
    most likely `(token_id, logprob)` there, most likely first; None when not asked."""

    prompt_text: str
    response_text: str
    prompt_tokens: list[str]
    response_tokens: list[str]
    prompt_token_ids: list[int]
    response_token_ids: list[int]
    prompt_activations: dict[int, dict[str, Tensor]] = field(default_factory=dict)
    response_activations: dict[int, dict[str, Tensor]] = field(default_factory=dict)
    response_logprobs: list[float] | None = None
    response_top_logprobs: list[list[tuple[int, float]]] | None = None


@dataclass
class ResponseLogprobs:
    """Teacher-forced scores of given responses, one entry per row: `logprobs[i]` `[n_response_tokens]` is
    `log p(token | everything before it)` (natural log, float32); `kl[i]` (same shape, nats) the KL divergence
    of the steered next-token distribution from the unsteered one at those positions, None when not asked."""

    logprobs: list[Tensor]
    kl: list[Tensor] | None = None
