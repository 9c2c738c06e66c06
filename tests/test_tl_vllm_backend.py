"""TLVLLMBackend against a stand-in for TransformerLens' vLLM driver and its instrumented engine.

The stand-in keeps TransformerLens' contract, checked here against the installed transformer-lens (so it cannot
drift silently): `validate_driver` accepts it, its `forward` has `VLLMDriver.forward`'s parameters, its worker
method has `TLWorkerExtension.tl_set_interventions`'s, its hook names are the ones TL's decoder-only overlay
declares, its edits are validated by TL's `validate_spec` and applied with TL's own op semantics. Underneath it
runs a tiny HF Llama, so steered generation and capture compare against `LocalBackend` on the same weights.

The last test runs the real engine and is skipped unless vLLM, a CUDA GPU and `RemoteBridge.boot_vllm` exist.
"""

from __future__ import annotations

import copy
import importlib.util
import inspect
import sys
from types import SimpleNamespace

import pytest
import torch
from transformer_lens.config import TransformerBridgeConfig
from transformer_lens.model_bridge.driver_protocol import ForwardResult, validate_driver
from transformer_lens.model_bridge.sources.vllm.driver import VLLMDriver
from transformer_lens.model_bridge.sources.vllm.intervention_specs import validate_spec
from transformer_lens.model_bridge.sources.vllm.overlays import DEFAULT_VLLM_OVERLAY
from transformer_lens.model_bridge.sources.vllm.worker_extension import TLWorkerExtension, _apply_op, resolve_dot_path

from tracelens.errors import BackendError
from tracelens.model.conditional import Condition
from tracelens.serving.backends import CaptureSpec, GenerationConfig, LocalBackend, SteeringSpec
from tracelens.serving.tl_vllm_backend import TLVLLMBackend, capture_sites, steering_edits, steering_groups

from conftest import cached_tiny

PROMPTS = ["What is the capital of France?", "Hi there", "Tell me something happy."]
GEN = GenerationConfig(max_new_tokens=5, temperature=0.0)


class StandInWorker:
    """TL's worker extension on an HF model: forward hooks at the overlay's module paths apply the current edits
    to every token of every forward (what TL's affine buffers do) and record the last forward's outputs."""

    def __init__(self, hf, hook_paths: dict[str, tuple[str, int]]) -> None:
        self.hf = hf
        self.widths = {name: width for name, (_, width) in hook_paths.items()}
        self.specs: dict[str, dict] = {}
        self.history: list[dict] = []
        self.last: dict[str, torch.Tensor] = {}
        for name, (path, _) in hook_paths.items():
            resolve_dot_path(hf, path).register_forward_hook(self._hook(name))

    def _hook(self, name):
        def hook(module, inputs, output):
            t = output[0] if isinstance(output, tuple) else output
            spec = self.specs.get(name)
            if spec is not None:
                t = _apply_op(t, spec)
            self.last[name] = t.detach()
            return (t, *output[1:]) if isinstance(output, tuple) else t
        return hook

    def tl_set_interventions(self, specs):
        for name, spec in specs.items():
            validate_spec(name, spec, width=self.widths[name])
        self.specs = dict(specs)
        self.history.append(self.specs)


class StandInEngine:
    """`vllm.LLM` as TL boots it: `generate` (greedy, no detokenizer) and `collective_rpc` to the worker."""

    def __init__(self, worker: StandInWorker, **kwargs) -> None:
        self.worker = worker
        self.kwargs = kwargs
        self.generate_calls: list[tuple[list[list[int]], dict]] = []
        self.counter = 7

    def collective_rpc(self, method, timeout=None, args=(), kwargs=None):
        return [getattr(self.worker, method)(*args, **(kwargs or {}))]

    @torch.no_grad()
    def generate(self, prompts, sampling_params):
        params = sampling_params.kwargs
        assert params["temperature"] == 0.0 and params["detokenize"] is False
        self.generate_calls.append(([list(p["prompt_token_ids"]) for p in prompts], dict(self.worker.specs)))
        outs = []
        for p in prompts:
            seq = list(p["prompt_token_ids"])
            new: list[int] = []
            while len(new) < params["max_tokens"]:
                token = int(self.worker.hf(torch.tensor([seq + new])).logits[0, -1].argmax())
                new.append(token)
                if token in params.get("stop_token_ids", ()):
                    break
            outs.append(SimpleNamespace(request_id=str(self.counter), prompt_token_ids=seq,
                                        outputs=[SimpleNamespace(text=None, token_ids=new)]))
            self.counter += 1
        return outs[::-1]  # finished out of order


class StandInDriver:
    """`VLLMDriver`'s protocol surface over the stand-in engine."""

    _supported_features = frozenset({"weight_access"})
    provides_sequence_logits = False

    def __init__(self, hf, tokenizer, engine: StandInEngine) -> None:
        cfg = hf.config
        self.architecture = cfg.architectures[0]
        self.bridge_config = TransformerBridgeConfig(
            d_model=cfg.hidden_size, d_head=cfg.hidden_size // cfg.num_attention_heads, n_layers=cfg.num_hidden_layers,
            n_ctx=cfg.max_position_embeddings, n_heads=cfg.num_attention_heads, d_vocab=cfg.vocab_size,
            architecture=self.architecture)
        self.tokenizer = tokenizer
        self.supported_hook_points = frozenset(DEFAULT_VLLM_OVERLAY.capture_specs(cfg))
        self.non_fireable_hook_points = frozenset(
            t.replace("{i}", str(i)) for t in DEFAULT_VLLM_OVERLAY.nonfiring_hooks()
            for i in range(cfg.num_hidden_layers))
        self._llm = engine
        self.closed = 0
        self.forward_calls: list[dict] = []

    @torch.no_grad()
    def forward(self, input_ids=None, *, capture=(), intervene=None, max_new_tokens=1, return_logits=True, **kwargs):
        if int(max_new_tokens) != 1:
            raise NotImplementedError("VLLMDriver supports max_new_tokens=1 only")
        for name in intervene or {}:
            if name not in self.supported_hook_points:
                raise ValueError(f"Cannot intervene on {name!r}: not in supported_hook_points.")
        self.forward_calls.append({"capture": tuple(capture), "intervene": dict(intervene or {})})
        self._llm.collective_rpc("tl_set_interventions", args=(dict(intervene or {}),))
        logits = self._llm.worker.hf(torch.as_tensor(input_ids)).logits
        captured = {name: self._llm.worker.last[name].clone() for name in capture}
        return ForwardResult(logits=logits if return_logits else None, captured=captured)

    def close(self):
        self.closed += 1

    def supports(self, feature):
        return feature in self._supported_features


class StandInBoot:
    """`RemoteBridge.boot_vllm`: records its arguments, returns a bridge holding the stand-in driver."""

    def __init__(self, hf, tokenizer) -> None:
        self.hf, self.tokenizer = hf, tokenizer
        self.calls: list[tuple[str, dict]] = []

    def __call__(self, model_name, **kwargs):
        self.calls.append((model_name, kwargs))
        worker = StandInWorker(copy.deepcopy(self.hf), DEFAULT_VLLM_OVERLAY.capture_specs(self.hf.config))
        driver = StandInDriver(worker.hf, self.tokenizer, StandInEngine(worker, **kwargs))
        return SimpleNamespace(_driver=driver, close=driver.close)


class SamplingParams:
    def __init__(self, **kwargs):
        self.kwargs = kwargs


@pytest.fixture(scope="module")
def tiny():
    return cached_tiny("llama", n_layers=3, init_std=0.2)


def make(tiny, **kwargs) -> TLVLLMBackend:
    return TLVLLMBackend("org/tiny-llama", tokenizer=tiny.tokenizer, boot=StandInBoot(tiny.reference, tiny.tokenizer),
                         sampling_params_cls=SamplingParams, **kwargs)


def _unit(d, seed):
    v = torch.randn(d, generator=torch.Generator().manual_seed(seed))
    return v / v.norm()


def _params(fn):
    return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]


def test_the_stand_in_keeps_transformer_lens_contract(tiny):
    b = make(tiny)
    validate_driver(b.driver, after_bridge_construction=True)
    assert _params(StandInDriver.forward) == _params(VLLMDriver.forward)
    assert _params(StandInWorker.tl_set_interventions) == _params(TLWorkerExtension.tl_set_interventions)
    # the hook names this backend targets are ones TL's overlay declares fireable
    for name in ("blocks.0.hook_out", "blocks.2.attn.hook_out", "blocks.1.mlp.hook_out"):
        assert name in b.driver.supported_hook_points
    assert "blocks.0.attn.hook_k" in b.driver.non_fireable_hook_points


def test_mapping_names_layer_component_sign_and_scale():
    v, w = torch.arange(4.0), torch.ones(4)
    edits = steering_edits([SteeringSpec(layer=1, vector=v, coefficient=-2.5), SteeringSpec(layer=-1, vector=w, coefficient=3.0, component="attn_out"),
                            SteeringSpec(layer=1, vector=w, coefficient=0.5), SteeringSpec(layer=0, vector=v, coefficient=1.0, component="mlp_out")], n_layers=3, d_model=4)
    assert edits == {"blocks.1.hook_out": {"op": "add", "value": [0.5, -2.0, -4.5, -7.0]},
                     "blocks.2.attn.hook_out": {"op": "add", "value": [3.0] * 4},
                     "blocks.0.mlp.hook_out": {"op": "add", "value": [0.0, 1.0, 2.0, 3.0]}}
    assert capture_sites(CaptureSpec([0, -1], ["residual", "mlp_out"]), 3) == [
        (0, "residual", "blocks.0.hook_out"), (0, "mlp_out", "blocks.0.mlp.hook_out"),
        (2, "residual", "blocks.2.hook_out"), (2, "mlp_out", "blocks.2.mlp.hook_out")]
    groups = steering_groups([SteeringSpec(layer=0, vector=v, coefficient=1.0, rows=(1, 3)), SteeringSpec(layer=2, vector=w, coefficient=2.0)], 4, 3, 4)
    assert [rows for rows, _ in groups] == [[0, 3], [1, 2]]
    assert set(groups[0][1]) == {"blocks.2.hook_out"} and set(groups[1][1]) == {"blocks.0.hook_out", "blocks.2.hook_out"}


@pytest.mark.parametrize("layer, component", [(1, "residual"), (-1, "residual"), (0, "attn_out"), (2, "mlp_out")])
def test_steered_generation_equals_local_backend(tiny, layer, component):
    local = LocalBackend.from_model(tiny.model)
    steering = [SteeringSpec(layer=layer, vector=_unit(64, 3), coefficient=6.0, component=component)]
    b = make(tiny)
    got = b.generate_results(PROMPTS, GEN, steering)
    want = local.generate_results(PROMPTS, GEN, steering)
    assert [r.response_token_ids for r in got] == [r.response_token_ids for r in want]
    assert [r.response_text for r in got] == [r.response_text for r in want]
    assert [r.prompt_token_ids for r in got] == [r.prompt_token_ids for r in want]
    assert [r.response_token_ids for r in b.generate_results(PROMPTS, GEN)] != [r.response_token_ids for r in got]
    assert b.llm.worker.specs == {}  # edits cleared after the call


def test_per_prompt_rows_run_as_groups(tiny):
    local = LocalBackend.from_model(tiny.model)
    steering = [SteeringSpec(layer=1, vector=_unit(64, 4), coefficient=6.0, rows=(0, 1)), SteeringSpec(layer=0, vector=_unit(64, 5), coefficient=-5.0, rows=(1, 3))]
    b = make(tiny)
    got = b.generate_results(PROMPTS, GEN, steering)
    assert [r.response_token_ids for r in got] == [r.response_token_ids for r in local.generate_results(PROMPTS, GEN, steering)]
    (first_ids, first_edits), (rest_ids, rest_edits) = b.llm.generate_calls
    assert len(first_ids) == 1 and set(first_edits) == {"blocks.1.hook_out"}
    assert len(rest_ids) == 2 and set(rest_edits) == {"blocks.0.hook_out"}


def test_capture_equals_local_backend_at_prompt_and_response_positions(tiny):
    local = LocalBackend.from_model(tiny.model)
    steering = [SteeringSpec(layer=1, vector=_unit(64, 6), coefficient=4.0), SteeringSpec(layer=0, vector=_unit(64, 7), coefficient=2.0, component="mlp_out", rows=(1, 2))]
    capture = CaptureSpec([0, -1], ["residual", "attn_out", "mlp_out"])
    b = make(tiny)
    got = b.generate_with_capture(PROMPTS, GEN, capture, steering)
    want = local.generate_with_capture(PROMPTS, GEN, capture, steering)
    for g, w in zip(got, want):
        assert g.response_token_ids == w.response_token_ids
        assert set(g.prompt_activations) == set(w.prompt_activations) == {0, 2}
        for layer in (0, 2):
            for c in capture.components:
                assert g.prompt_activations[layer][c].shape == (len(g.prompt_token_ids), 64)
                assert g.response_activations[layer][c].shape == (len(g.response_token_ids), 64)
                torch.testing.assert_close(g.prompt_activations[layer][c], w.prompt_activations[layer][c], atol=1e-4, rtol=1e-4)
                torch.testing.assert_close(g.response_activations[layer][c], w.response_activations[layer][c], atol=1e-4, rtol=1e-4)
    assert b.llm.worker.specs == {}
    assert {c["capture"] for c in b.driver.forward_calls} == {
        ("blocks.0.hook_out", "blocks.0.attn.hook_out", "blocks.0.mlp.hook_out",
         "blocks.2.hook_out", "blocks.2.attn.hook_out", "blocks.2.mlp.hook_out")}


@pytest.mark.parametrize("spec, match", [
    (dict(positions="response"), "positions='response'.*LocalBackend"),
    (dict(component="attn_contribution"), "'attn_contribution'.*use component 'attn_out'"),
    (dict(component="mlp_contribution"), "'mlp_contribution'.*use component 'mlp_out'"),
    (dict(component="k_proj"), "'k_proj'.*fuses q/k/v"),
])
def test_what_the_driver_cannot_do_is_refused_before_any_engine_call(tiny, spec, match):
    b = make(tiny)
    with pytest.raises(BackendError, match=match):
        b.generate_results(PROMPTS, GEN, [SteeringSpec(layer=1, vector=_unit(64, 0), coefficient=1.0, **spec)])
    assert b.llm.generate_calls == [] and b.llm.worker.history == []


def test_conditional_steering_and_unsupported_capture_are_refused(tiny):
    b = make(tiny)
    cond = Condition(vector=_unit(64, 1), layer=0, threshold=0.0)
    with pytest.raises(BackendError, match="conditionally"):
        b.generate_results(PROMPTS, GEN, [SteeringSpec(layer=1, vector=_unit(64, 0), coefficient=1.0, condition=cond)])
    with pytest.raises(BackendError, match="capture at component 'v_proj'"):
        b.generate_with_capture(PROMPTS, GEN, CaptureSpec([0], ["v_proj"]))
    assert b.llm.generate_calls == []


def test_bad_vectors_rows_and_layers_are_refused(tiny):
    b = make(tiny)
    with pytest.raises(ValueError, match="64"):
        b.generate_results(PROMPTS, GEN, [SteeringSpec(layer=1, vector=torch.ones(65), coefficient=1.0)])
    with pytest.raises(ValueError, match="within the 3 prompts"):
        b.generate_results(PROMPTS, GEN, [SteeringSpec(layer=1, vector=torch.ones(64), coefficient=1.0, rows=(2, 4))])
    with pytest.raises(ValueError, match="out of range"):
        b.generate_results(PROMPTS, GEN, [SteeringSpec(layer=3, vector=torch.ones(64), coefficient=1.0)])
    assert b.llm.generate_calls == []


def test_boot_arguments_and_shutdown(tiny):
    boot = StandInBoot(tiny.reference, tiny.tokenizer)
    b = TLVLLMBackend("org/m-AWQ", seed=3, tokenizer=tiny.tokenizer, boot=boot, sampling_params_cls=SamplingParams,
                      tensor_parallel_size=2, max_model_len=512)
    assert boot.calls == [("org/m-AWQ", {"seed": 3, "tensor_parallel_size": 2, "max_model_len": 512,
                                         "quantization": "awq"})]
    with pytest.raises(BackendError, match="enable_batching"):
        TLVLLMBackend("m", tokenizer=tiny.tokenizer, boot=boot, sampling_params_cls=SamplingParams, enable_batching=True)
    driver = b.driver
    b.shutdown()
    b.shutdown()
    assert driver.closed == 1
    with pytest.raises(RuntimeError, match="shut down"):
        b.generate_results(["p"])


def test_missing_vllm_names_transformer_lens_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)
    with pytest.raises(ImportError, match=r"transformer-lens\[vllm\]>=4.3"):
        TLVLLMBackend("org/tiny-model")


def _real_engine_available() -> bool:
    if importlib.util.find_spec("vllm") is None or not torch.cuda.is_available():
        return False
    from transformer_lens.model_bridge import RemoteBridge

    return hasattr(RemoteBridge, "boot_vllm")


@pytest.mark.skipif(not _real_engine_available(), reason="needs vLLM, a CUDA GPU and RemoteBridge.boot_vllm (real engine)")
def test_real_engine_steers_during_decode_and_captures():
    """On the real engine: the steered residual differs from the unsteered one by exactly coefficient * v at
    every captured position (site, sign and scale), steering changes decoded tokens, and greedy steered
    tokens follow LocalBackend's (fp32, the same weights) for the first few tokens."""
    from tracelens.model.loading import load_model

    model_id = "HuggingFaceTB/SmolLM2-135M-Instruct"
    b = TLVLLMBackend(model_id, seed=0, dtype=torch.float32, gpu_memory_utilization=0.3, max_model_len=512)
    try:
        v = _unit(b.hidden_dim, 0)
        steer = [SteeringSpec(layer=10, vector=v, coefficient=8.0)]
        capture = CaptureSpec([10], ["residual"])
        cfg = GenerationConfig(max_new_tokens=8, temperature=0.0)
        plain = b.generate_with_capture(["Tell me about the sea."], cfg, capture)[0]
        steered = b.generate_with_capture(["Tell me about the sea."], cfg, capture, steer)[0]
        n = len(plain.prompt_token_ids)
        diff = steered.prompt_activations[10]["residual"] - plain.prompt_activations[10]["residual"]
        torch.testing.assert_close(diff, (8.0 * v).expand(n, -1), atol=2e-3, rtol=0)
        far = b.generate_results(["Tell me about the sea."], cfg, [SteeringSpec(layer=10, vector=v, coefficient=80.0)])[0]
        assert far.response_token_ids != plain.response_token_ids
        local = LocalBackend(load_model(model_id, device="cuda", dtype=torch.float32))
        want = local.generate_results(["Tell me about the sea."], cfg, steer)[0]
        assert steered.response_token_ids[:4] == want.response_token_ids[:4]
    finally:
        b.shutdown()
