"""The request vocabulary (`tracelens.model.requests`): one class per concept under both of the seed's names, checked
at construction with one message style, and the model-dependent checks `LocalBackend` runs before any work."""

import re

import pytest
import torch
from conftest import cached_tiny

import tracelens
from tracelens.errors import ConfigError, DirectionError, InputTypeError, ShapeError
from tracelens.model import generation, requests
from tracelens.model.conditional import Condition as ConditionFromConditional
from tracelens.model.hooks import MultiLayerSteering, PerSampleSteering
from tracelens.serving import backends
from tracelens.serving.backends import LocalBackend


def test_the_seeds_names_are_the_same_classes_everywhere():
    assert generation.SteeringConfig is backends.SteeringSpec is tracelens.SteeringConfig is requests.SteeringSpec
    assert generation.CaptureConfig is backends.CaptureSpec is tracelens.CaptureSpec is requests.CaptureSpec
    assert generation.TokenOutput is backends.TokenResult is tracelens.TokenOutput is requests.TokenOutput
    assert backends.GenerationConfig is tracelens.GenerationConfig is requests.GenerationConfig
    assert backends.CaptureResult is requests.CaptureResult and ConditionFromConditional is requests.Condition
    v = torch.ones(4)
    # the seed's two keyword spellings build equal specs
    a = requests.SteeringConfig(vector=v, layer=14, coefficient=1.5)
    b = requests.SteeringSpec(layer=14, vector=v, coefficient=1.5)
    assert (a.layer, a.coefficient, a.component, a.positions) == (b.layer, b.coefficient, b.component, b.positions)
    tok = requests.TokenOutput(token_id=7, step=0, token="x")
    assert (tok.token_id, tok.token) == (7, "x")
    with pytest.raises(TypeError):  # two positional orders existed: keywords only
        requests.SteeringSpec(14, v)


V = torch.ones(4)
BAD = [
    (lambda: requests.GenerationConfig(max_new_tokens=0), ConfigError, "max_new_tokens must be an integer >= 1; got 0"),
    (lambda: requests.GenerationConfig(max_new_tokens=True), ConfigError, "max_new_tokens must be an integer >= 1; got True"),
    (lambda: requests.GenerationConfig(temperature=-1), ConfigError, "temperature must be >= 0; got -1.0"),
    (lambda: requests.GenerationConfig(temperature=float("nan")), ConfigError, "temperature must be a finite number; got nan"),
    (lambda: requests.GenerationConfig(stop_token_ids=[1, -2]), ConfigError,
     "stop_token_ids must be None or a list of integers >= 0; got [1, -2]"),
    (lambda: requests.GenerationConfig(seed=2**64), ConfigError, "seed must be None or an integer in [0, 2**64); got"),
    (lambda: requests.SteeringSpec(layer=1.0, vector=V), InputTypeError, "layer must be an integer; got float 1.0"),
    (lambda: requests.SteeringSpec(layer=0, vector=[1.0]), InputTypeError, "vector must be a torch.Tensor; got list"),
    (lambda: requests.SteeringSpec(layer=0, vector=torch.ones(2, 2)), ShapeError, "vector must be 1-D [d_model]; got shape (2, 2)"),
    (lambda: requests.SteeringSpec(layer=0, vector=torch.tensor([1.0, float("inf")])), DirectionError,
     "vector contains NaN or inf"),
    (lambda: requests.SteeringSpec(layer=0, vector=V, coefficient="2"), InputTypeError, "coefficient must be a number; got str"),
    (lambda: requests.SteeringSpec(layer=0, vector=V, component="resid"), ConfigError,
     "component must be one of residual, attn_contribution"),
    (lambda: requests.SteeringSpec(layer=0, vector=V, positions="prompt"), ConfigError,
     "positions must be one of all, response; got 'prompt'"),
    (lambda: requests.SteeringSpec(layer=0, vector=V, rows=(2, 2)), ConfigError,
     "rows must be (start, end) integers with 0 <= start < end; got (2, 2)"),
    (lambda: requests.SteeringSpec(layer=0, vector=V, positions="response", condition=requests.Condition(V, 0, 0.0)),
     ConfigError, "conditional steering covers every position: positions must be 'all'; got 'response'"),
    (lambda: requests.Condition(V, 0, 0.0, comparator=">"), ConfigError, "comparator must be one of greater, less; got '>'"),
    (lambda: requests.CaptureSpec(components="residual"), ConfigError,
     "components must be a non-empty list of component names; got 'residual'"),
    (lambda: requests.CaptureSpec(layers=[0, "1"]), ConfigError,
     "layers must be None (every layer) or a list of integers; got [0, '1']"),
    (lambda: requests.SteeringSpec.from_tuple((0, V), what="configs[3]"), ConfigError, "configs[3] must be a SteeringSpec or"),
    (lambda: requests.SteeringSpec.from_tuple((0, V, 1.0, (3, 1)), what="configs[0]"), ConfigError,
     "configs[0]: rows must be (start, end) integers with 0 <= start < end; got (3, 1)"),
]


@pytest.mark.unchecked_types
@pytest.mark.parametrize(("make", "kind", "message"), BAD, ids=[m[:40] for _, _, m in BAD])
def test_each_request_type_refuses_bad_values_in_one_style(make, kind, message):
    with pytest.raises(kind, match="^" + re.escape(message)):
        make()


@pytest.mark.unchecked_types  # a list for rows and for layers: normalised, not refused
def test_values_are_normalised_at_construction():
    spec = requests.SteeringSpec(layer=-1, vector=torch.ones(4, dtype=torch.float16), coefficient=2, rows=[0, 2])
    assert spec.vector.dtype == torch.float32 and spec.coefficient == 2.0 and spec.rows == (0, 2)
    capture = requests.CaptureSpec((1, -1), ["residual"])
    assert capture.layers == [1, -1] and capture.components == ("residual",)
    assert requests.GenerationConfig(stop_token_ids=(3, 4), temperature=1).stop_token_ids == [3, 4]


def test_the_seeds_tuples_convert_through_the_spec():
    v = torch.ones(4)
    assert requests.SteeringSpec.from_tuple((2, v, 1.5), "mlp_out").component == "mlp_out"
    assert requests.SteeringSpec.from_tuple((2, v, 1.5, "attn_out")).component == "attn_out"
    assert requests.SteeringSpec.from_tuple((2, v, 1.5, (0, 3))).rows == (0, 3)


@pytest.fixture(scope="module")
def tiny():
    return cached_tiny("llama")


def test_adapters_take_specs_and_tuples_alike(tiny):
    d = tiny.model.cfg.d_model
    v = torch.randn(d, generator=torch.Generator().manual_seed(0))
    ids = torch.tensor([[1, 2, 3], [4, 5, 6]])
    with torch.no_grad(), PerSampleSteering(tiny.model, [(1, v, 3.0, (1, 2))]):
        by_tuple = tiny.model(ids)
    with torch.no_grad(), PerSampleSteering(tiny.model, [requests.SteeringSpec(layer=1, vector=v, coefficient=3.0,
                                                                               rows=(1, 2))]):
        by_spec = tiny.model(ids)
    with torch.no_grad():
        plain = tiny.model(ids)
    assert torch.equal(by_tuple, by_spec) and torch.equal(by_spec[0], plain[0]) and not torch.equal(by_spec[1], plain[1])
    with pytest.raises(ConfigError, match=r"MultiLayerSteering steers every row at every position: configs\[0\]"):
        MultiLayerSteering(tiny.model, [requests.SteeringSpec(layer=1, vector=v, positions="response")])


@pytest.mark.unchecked_types
def test_the_backend_checks_steering_and_capture_against_the_model_first(tiny):
    backend = LocalBackend.from_model(tiny.model)
    d = tiny.model.cfg.d_model
    cases = [
        ({"steering": [requests.SteeringSpec(layer=0, vector=torch.ones(d)), requests.SteeringSpec(layer=5, vector=torch.ones(d))]},
         ConfigError, "steering[1]: layer 5 is out of range for a model with 2 layers"),
        ({"steering": [requests.SteeringSpec(layer=0, vector=torch.ones(d + 1))]}, ShapeError,
         f"steering[0]: vector has {d + 1} elements but blocks.0.hook_resid_post has width {d}"),
        ({"steering": [requests.SteeringSpec(layer=0, vector=torch.ones(d), rows=(0, 3))]}, ConfigError,
         "steering[0]: rows must lie within the 2 prompts; got (0, 3)"),
        ({"steering": [(0, torch.ones(d), 1.0)]}, InputTypeError, "steering[0] must be a SteeringSpec; got tuple"),
        ({"capture": requests.CaptureSpec([2])}, ConfigError, "capture: layer 2 is out of range for a model with 2 layers"),
    ]
    for kwargs, kind, message in cases:
        with pytest.raises(kind, match="^" + re.escape(message)):
            backend.check_generation(["a", "b"], **kwargs)
        if "capture" not in kwargs:
            with pytest.raises(kind, match="^" + re.escape(message)):
                backend.generate(["a", "b"], requests.GenerationConfig(max_new_tokens=1), kwargs["steering"])


def test_the_rows_rule_is_one_function_with_one_message_everywhere(tiny):
    """Backend, generator, vLLM driver grouping and server parser all refuse rows past the call's prompts alike."""
    from tracelens.errors import RequestError
    from tracelens.serving.parsing import parse_steering
    from tracelens.serving.tl_vllm_backend import steering_groups

    d = tiny.model.cfg.d_model
    spec = requests.SteeringSpec(layer=0, vector=torch.ones(d), rows=(0, 3))
    message = "^" + re.escape("steering[0]: rows must lie within the 2 prompts; got (0, 3)") + "$"
    for call in (lambda: LocalBackend.from_model(tiny.model).check_generation(["a", "b"], steering=[spec]),
                 lambda: generation.HookedGenerator(tiny.model).generate(torch.tensor([[1, 2], [3, 4]]),
                                                                         max_new_tokens=1, steering=[spec]),
                 lambda: steering_groups([spec], 2, tiny.model.cfg.n_layers, d)):
        with pytest.raises(ConfigError, match=message):
            call()
    with pytest.raises(RequestError, match=message):
        parse_steering([{"layer": 0, "vector": [1.0] * d, "rows": [0, 3]}], tiny.model.cfg.n_layers, n_rows=2)


def test_a_request_checks_its_vector_once_when_the_spec_is_built(tiny, monkeypatch):
    """`check_generation` checks the model's facts on the spec itself: no adapter, no second `as_vector`."""
    from tracelens.model import edits

    d = tiny.model.cfg.d_model
    specs = [requests.SteeringSpec(layer=0, vector=torch.ones(d), rows=(0, 1)),
             requests.SteeringSpec(layer=1, vector=torch.ones(d), positions="response")]
    seen = []
    as_vector = edits.as_vector
    monkeypatch.setattr(edits, "as_vector", lambda v, what="vector": seen.append(what) or as_vector(v, what))
    monkeypatch.setattr(requests, "as_vector", edits.as_vector)
    LocalBackend.from_model(tiny.model).check_generation(["a", "b"], requests.GenerationConfig(max_new_tokens=1),
                                                      steering=specs)
    assert seen == []
