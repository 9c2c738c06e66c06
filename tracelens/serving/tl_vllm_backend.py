"""`TLVLLMBackend`: residual steering and activation capture on a vLLM engine, through TransformerLens 4's
vLLM driver (`RemoteBridge.boot_vllm`), with the same `SteeringSpec` / `CaptureSpec` as `LocalBackend`.

What the driver offers and how it maps (read from transformer-lens 4.3.0; docs/vllm.md has the details):

- sites: `blocks.{L}.hook_out` (residual after block L = tracelens "residual"), `blocks.{L}.attn.hook_out`
  ("attn_out", the o_proj output), `blocks.{L}.mlp.hook_out` ("mlp_out", the down_proj output). Nothing else
  per layer fires (vLLM fuses q/k/v, attention patterns and the block inputs): other components raise
  BackendError naming the alternative.
- edits: declarative `{"op": "add", "value": [d]}` specs kept in worker-side affine buffers that every forward
  applies to every token, prefill and decode alike, for every request in the engine. So a `SteeringSpec` with
  `positions="all"` is exactly `coefficient * vector` added at its site, during generation too;
  `positions="response"` (from the last prompt token on) cannot be expressed (the driver's optional `pos`
  rows index the tokens of one forward, which during decode are requests, not positions) and a `condition`
  needs a Python hook; both raise BackendError. Per-prompt steering (`rows`) runs each group of prompts that
  share a steering set as its own engine call.
- capture: the driver captures one forward (`max_new_tokens=1`) per prompt. Like `LocalBackend`,
  `generate_with_capture` generates first, then reads every prompt and response position from one forward
  over prompt + response under the same steering.
- tensor parallelism: `tensor_parallel_size` (and `pipeline_parallel_size`) go to `boot_vllm`; every site above
  is post-all-reduce, the edits reach every rank through `collective_rpc`.

Needs transformer-lens 4.3 with its vLLM extra (vLLM 0.20.x, Linux, CUDA): ``pip install 'transformer-lens[vllm]>=4.3,<4.4'``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

from tracelens.errors import BackendError, StateError
from tracelens.model.prompts import encode
from tracelens.model.requests import check_steering_request, check_width
from tracelens.model.sites import resolve_layer
from tracelens.serving.backends import CaptureResult, CaptureSpec, GenerationConfig, SteeringSpec
from tracelens.serving.prompting import covering
from tracelens.serving.vllm_backend import VLLMBackend

INSTALL_HINT = "pip install 'transformer-lens[vllm]>=4.3,<4.4' (vLLM 0.20.x, Linux, CUDA)"

SITES: dict[str, str] = {
    "residual": "blocks.{layer}.hook_out",
    "attn_out": "blocks.{layer}.attn.hook_out",
    "mlp_out": "blocks.{layer}.mlp.hook_out",
}
"""tracelens component -> the hook name TransformerLens' vLLM driver serves for it."""

_INSTEAD = {
    "attn_contribution": "use component 'attn_out' (the o_proj output: the same tensor on Llama, Mistral and Qwen, "
                         "not on Gemma-2/3, whose post-attention norm follows it) or LocalBackend",
    "mlp_contribution": "use component 'mlp_out' (the down_proj output: the same tensor on Llama, Mistral and Qwen, "
                        "not on Gemma-2/3, whose post-feedforward norm follows it) or LocalBackend",
    "k_proj": "vLLM fuses q/k/v into one kernel (TransformerLens declares attn.hook_k non-fireable); use LocalBackend",
    "v_proj": "vLLM fuses q/k/v into one kernel (TransformerLens declares attn.hook_v non-fireable); use LocalBackend",
}

Edits = dict[str, dict[str, Any]]
"""The driver's intervention mapping: `{hook_name: {"op": "add", "value": [d floats]}}`."""


def import_boot_vllm() -> Callable[..., Any]:
    """TransformerLens' `RemoteBridge.boot_vllm`, or an ImportError naming what to install."""
    try:
        from transformer_lens.model_bridge import RemoteBridge
    except ImportError as err:
        raise ImportError(f"TLVLLMBackend needs transformer-lens >= 4.3 (RemoteBridge.boot_vllm): {INSTALL_HINT}") from err
    if not hasattr(RemoteBridge, "boot_vllm"):
        raise ImportError(f"the installed transformer-lens has no RemoteBridge.boot_vllm: {INSTALL_HINT}")
    try:
        import vllm  # noqa: F401
    except ImportError as err:
        raise ImportError(f"TLVLLMBackend needs vLLM, which is not installed: {INSTALL_HINT}") from err
    return RemoteBridge.boot_vllm


def site(layer: int, component: str, n_layers: int, what: str = "steering") -> str:
    """The driver's hook name for `component` at `layer` (negative layers count from the end)."""
    if component not in SITES:
        hint = _INSTEAD.get(component, f"components served: {', '.join(SITES)}")
        raise BackendError(f"TransformerLens' vLLM driver cannot serve {what} at component {component!r}: {hint}")
    return SITES[component].format(layer=resolve_layer(layer, n_layers))


def steering_edits(steering: Sequence[SteeringSpec], n_layers: int, d_model: int) -> Edits:
    """The driver's edits for specs that all apply to the same prompts: one `add` per site, the sum of
    `coefficient * vector` over the specs at that site (float32, sent as a list of floats)."""
    sums: dict[str, Tensor] = {}
    for spec in steering:
        name = steering_site(spec, n_layers, d_model)
        sums[name] = sums.get(name, torch.zeros(d_model)) + spec.coefficient * spec.vector
    return {name: {"op": "add", "value": total.tolist()} for name, total in sums.items()}


def steering_site(spec: SteeringSpec, n_layers: int, d_model: int) -> str:
    """The driver's hook name for `spec`, after the model facts: a spec the driver can steer (`check_steerable`),
    at a site it serves inside the model, with a vector of the model's width (`check_width`)."""
    check_steerable(spec)
    name = site(spec.layer, spec.component, n_layers)
    check_width(spec.vector, d_model, name)
    return name


def check_steerable(spec: SteeringSpec) -> None:
    """BackendError for what the driver cannot do: response-only positions, conditional steering."""
    if spec.condition is not None:
        raise BackendError("TransformerLens' vLLM driver cannot steer conditionally (CAST needs a Python hook that "
                           "reads each row's activation; the driver takes declarative edits only); use LocalBackend")
    if spec.positions != "all":
        raise BackendError(
            f"TransformerLens' vLLM driver cannot steer positions={spec.positions!r}: its edits apply to every token "
            "of every forward, prefill and decode alike (its 'pos' rows index one forward's tokens, which during "
            "decode are requests, not positions); use positions='all' or LocalBackend")


def steering_groups(steering: Sequence[SteeringSpec] | None, n_prompts: int, n_layers: int,
                    d_model: int) -> list[tuple[list[int], Edits]]:
    """Prompts grouped by the steering that applies to them (`rows=None`: all prompts), each group with its
    edits, in order of first prompt; every prompt is in exactly one group. Checks every spec first
    (`check_steering_request`, with the driver's model facts: `steering_site`)."""
    steering = check_steering_request(steering, n_prompts, lambda spec: steering_site(spec, n_layers, d_model))
    groups: dict[tuple[int, ...], list[int]] = {}
    for i in range(n_prompts):
        groups.setdefault(tuple(covering(steering, i, i + 1)), []).append(i)
    return [(rows, steering_edits([steering[k] for k in key], n_layers, d_model)) for key, rows in groups.items()]


def capture_sites(capture: CaptureSpec, n_layers: int) -> list[tuple[int, str, str]]:
    """`(layer, component, hook_name)` for every requested site (`layers=None`: all layers)."""
    layers = range(n_layers) if capture.layers is None else [resolve_layer(l, n_layers) for l in capture.layers]
    return [(l, c, site(l, c, n_layers, "capture")) for l in layers for c in capture.components]


def split_capture(captured: dict[str, Any], sites: list[tuple[int, str, str]], n_prompt: int,
                  n_total: int) -> tuple[dict[int, dict[str, Tensor]], dict[int, dict[str, Tensor]]]:
    """The driver's `captured` (`[1, n_total, d]` per hook) as `CaptureResult` prompt and response activations
    (`[n_prompt, d]` and `[n_total - n_prompt, d]`, float32 on the CPU)."""
    from transformer_lens.model_bridge.driver_protocol import to_torch

    prompt: dict[int, dict[str, Tensor]] = {}
    response: dict[int, dict[str, Tensor]] = {}
    for layer, component, name in sites:
        if name not in captured:
            raise BackendError(f"TransformerLens' vLLM driver returned no capture for {name}")
        t = to_torch(captured[name])
        if t.dim() != 3 or t.shape[0] != 1 or t.shape[1] < n_total:
            raise BackendError(f"capture {name} has shape {tuple(t.shape)}; expected [1, {n_total}, d]")
        t = t[0, :n_total].float().cpu()
        prompt.setdefault(layer, {})[component] = t[:n_prompt]
        response.setdefault(layer, {})[component] = t[n_prompt:]
    return prompt, response


def driver_and_engine(bridge) -> tuple[Any, Any]:
    """The `VLLMDriver` a `boot_vllm` bridge wraps and its `vllm.LLM` (TransformerLens keeps both private:
    `bridge._driver`, `driver._llm`, as of 4.3.0); BackendError if that layout changed."""
    driver = getattr(bridge, "_driver", None)
    engine = getattr(driver, "_llm", None)
    ok = (isinstance(getattr(driver, "supported_hook_points", None), frozenset) and callable(getattr(driver, "forward", None))
          and callable(getattr(engine, "generate", None)) and callable(getattr(engine, "collective_rpc", None)))
    if not ok:
        raise BackendError("this transformer-lens' RemoteBridge does not hold its vLLM driver and engine as 4.3.0 does "
                           f"(bridge._driver._llm); TLVLLMBackend is built for {INSTALL_HINT}")
    return driver, engine


class TLVLLMBackend(VLLMBackend):
    """`VLLMBackend` on TransformerLens' instrumented vLLM engine: generation with residual / attn_out /
    mlp_out steering at all positions, and `generate_with_capture` at those sites.

    `boot_kwargs` (`tensor_parallel_size`, `gpu_memory_utilization`, `max_model_len`, `max_num_batched_tokens`,
    `dtype`, other `vllm.LLM` arguments) go to `RemoteBridge.boot_vllm`; `boot` replaces it (tests pass a
    stand-in). TransformerLens locks prefix caching off and skips vLLM's tokenizer: texts are decoded here.
    A captured forward holds at most `max_num_batched_tokens` (boot_vllm's, default 2048) tokens.
    """

    def __init__(self, model_id: str, seed: int = 42, *, tokenizer=None, use_chat_template: bool | None = None,
                 boot: Callable[..., Any] | None = None, sampling_params_cls: Callable[..., Any] | None = None,
                 **boot_kwargs) -> None:
        if boot_kwargs.get("enable_batching"):
            raise BackendError("TLVLLMBackend needs TransformerLens' compiled path; enable_batching=True runs its eager "
                               "capture path, whose edits the engine-wide steering here does not reach")
        boot = boot or import_boot_vllm()
        self.bridge = None
        self._driver = None

        def boot_engine(model: str, seed: int, **kwargs):
            self.bridge = boot(model, seed=seed, **kwargs)
            self._driver, engine = driver_and_engine(self.bridge)
            return engine

        super().__init__(model_id, seed, tokenizer=tokenizer, use_chat_template=use_chat_template,
                         llm_factory=boot_engine, sampling_params_cls=sampling_params_cls, **boot_kwargs)

    @property
    def driver(self):
        if self._driver is None:
            raise StateError("this TLVLLMBackend has been shut down; make a new one")
        return self._driver

    @property
    def n_layers(self) -> int:
        return int(self.driver.bridge_config.n_layers)

    @property
    def hidden_dim(self) -> int:
        return int(self.driver.bridge_config.d_model)

    # --- generation ---------------------------------------------------------------------------------

    def generate_with_capture(self, prompts: Sequence[str], config: GenerationConfig | None = None,
                              capture: CaptureSpec | None = None, steering: Sequence[SteeringSpec] | None = None,
                              system_prompts: Sequence[str | None] | None = None) -> list[CaptureResult]:
        """Like `LocalBackend.generate_with_capture`: responses, then activations at every prompt and response
        position from one forward per prompt over prompt + response under the same steering."""
        sites = capture_sites(capture or CaptureSpec(), self.n_layers)
        texts = self._texts(prompts, system_prompts, False)
        groups = steering_groups(steering, len(texts), self.n_layers, self.hidden_dim)
        results = self._generate_groups(texts, config or GenerationConfig(), groups)
        names = tuple(dict.fromkeys(name for _, _, name in sites))
        try:
            for rows, edits in groups:
                for i in rows:
                    r = results[i]
                    ids = r.prompt_token_ids + r.response_token_ids
                    out = self.driver.forward(torch.tensor([ids]), capture=names, intervene=edits, max_new_tokens=1,
                                              return_logits=False)
                    r.prompt_activations, r.response_activations = split_capture(
                        dict(out.captured), sites, len(r.prompt_token_ids), len(ids))
        finally:
            self._set_edits({})  # the driver leaves a forward's edits in the engine
        return results

    def _run(self, texts: list[str], config: GenerationConfig, steering=None) -> list[CaptureResult]:
        """Results for formatted `texts`, in order, each group of prompts that shares a steering set
        (`steering_groups`, which checks the steering first) as its own engine call."""
        if not texts:
            return []
        return self._generate_groups(texts, config, steering_groups(steering, len(texts), self.n_layers,
                                                                    self.hidden_dim))

    def _generate_groups(self, texts: list[str], config: GenerationConfig,
                         groups: list[tuple[list[int], Edits]]) -> list[CaptureResult]:
        ids = [encode(self.tokenizer, t) for t in texts]
        completions: list = [None] * len(texts)
        for rows, edits in groups:
            with self._edits(edits):
                for i, completion in zip(rows, self._complete([ids[i] for i in rows], config)):
                    completions[i] = completion
        return self._results(texts, ids, completions)

    def _sampling_kwargs(self, config: GenerationConfig) -> dict[str, Any]:
        """vLLM runs without its tokenizer here: no detokenizing, and the tokenizer's EOS added to the stops."""
        kwargs = super()._sampling_kwargs(config)
        stops = list(config.stop_token_ids or ())
        eos = self.tokenizer.eos_token_id
        if eos is not None and eos not in stops:
            stops.append(int(eos))
        if stops:
            kwargs["stop_token_ids"] = stops
        kwargs["detokenize"] = False
        return kwargs

    def _response_text(self, completion, response_ids: list[int]) -> str:
        return self.tokenizer.decode(response_ids, skip_special_tokens=True).strip()

    @contextmanager
    def _edits(self, edits: Edits) -> Iterator[None]:
        """`edits` in force on every rank for the engine calls inside, cleared after (they persist otherwise)."""
        self._set_edits(edits)
        try:
            yield
        finally:
            self._set_edits({})

    def _set_edits(self, edits: Edits) -> None:
        self.llm.collective_rpc("tl_set_interventions", args=(edits,))

    # --- teardown -----------------------------------------------------------------------------------

    def shutdown(self) -> None:
        """Close the bridge (its hooks, engine and GPU memory); safe to call twice."""
        bridge, self.bridge, self._driver, self._llm = self.bridge, None, None, None
        if bridge is not None:
            bridge.close()

