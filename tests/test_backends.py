"""LocalBackend: generation, capture at prompt and response positions, batching and OOM halving."""

import pytest
import torch

from tracelens import get_hook_path
from tracelens.serving.backends import CaptureSpec, GenerationConfig, LocalBackend, SteeringSpec, _batched
from tracelens.model.prompts import tokenize_batch

from conftest import cached_tiny

PROMPTS = ["What is the capital of France?", "Hi there", "Tell me something happy."]


def _unit(d, seed):
    v = torch.randn(d, generator=torch.Generator().manual_seed(seed))
    return v / v.norm()


def test_batched_generation_equals_one_prompt_at_a_time(tiny):
    backend = LocalBackend.from_model(tiny.model)
    cfg = GenerationConfig(max_new_tokens=5)
    steering = [SteeringSpec(layer=1, vector=_unit(tiny.model.cfg.d_model, 0), coefficient=4.0)]
    together = backend.generate(PROMPTS, cfg, steering)
    backend.batch_size = 1
    assert backend.generate(PROMPTS, cfg, steering) == together
    assert backend.generate(PROMPTS, cfg) != together


@pytest.mark.parametrize("positions", ["all", "response"])
def test_capture_results_equal_a_forward_over_prompt_and_response(tiny, positions):
    backend = LocalBackend.from_model(tiny.model)
    v = _unit(tiny.model.cfg.d_model, 1)
    steering = [SteeringSpec(layer=0, vector=v, coefficient=3.0, positions=positions)]
    results = backend.generate_with_capture(PROMPTS, GenerationConfig(max_new_tokens=4), CaptureSpec([1], ["residual", "mlp_out"]), steering)
    for r in results:
        ids = torch.tensor([r.prompt_token_ids + r.response_token_ids])
        first = 0 if positions == "all" else len(r.prompt_token_ids) - 1

        def edit(act, hook):
            out = act.clone()
            out[:, first:] += 3.0 * v
            return out

        with torch.no_grad(), tiny.model.hooks(fwd_hooks=[(get_hook_path(0), edit)]):
            _, cache = tiny.model.run_with_cache(ids)
        n = len(r.prompt_token_ids)
        for comp in ("residual", "mlp_out"):
            full = cache[get_hook_path(1, comp)][0]
            assert r.prompt_activations[1][comp].shape == (n, tiny.model.cfg.d_model)
            assert r.response_activations[1][comp].shape == (len(r.response_token_ids), tiny.model.cfg.d_model)
            assert (r.prompt_activations[1][comp] - full[:n]).abs().max() <= 1e-5
            assert (r.response_activations[1][comp] - full[n:]).abs().max() <= 1e-5
        # ids past the tiny tokenizer's vocabulary (the model has spare rows) read "<id N>", never None
        expected = [t or f"<id {i}>" for i, t in zip(r.response_token_ids,
                                                     tiny.tokenizer.convert_ids_to_tokens(r.response_token_ids))]
        assert r.response_tokens == expected


def test_stream_matches_generate(tiny):
    backend = LocalBackend.from_model(tiny.model)
    cfg = GenerationConfig(max_new_tokens=5)
    tokens = list(backend.stream(PROMPTS[0], cfg, CaptureSpec([0])))
    text = backend.generate(PROMPTS[:1], cfg)[0]
    assert tiny.tokenizer.decode([t.token_id for t in tokens], skip_special_tokens=True).strip() == text
    assert tokens[0].activations[0]["residual"].shape == (tiny.model.cfg.d_model,)


def test_forward_with_capture_and_properties(tiny):
    backend = LocalBackend.from_model(tiny.model)
    ids, mask = tokenize_batch(tiny.tokenizer, PROMPTS)
    acts = backend.forward_with_capture(ids, mask, CaptureSpec([0, 1], ["residual", "attn_contribution"]))
    assert set(acts) == {0, 1} and set(acts[0]) == {"residual", "attn_contribution"}
    assert acts[1]["residual"].shape == (*ids.shape, backend.hidden_dim)
    assert (backend.n_layers, backend.hidden_dim, backend.device.type) == (2, 64, "cpu")


def test_from_experiment_loads_the_variant_its_lora_adapter_and_its_chat_template_setting(tmp_path):
    from tracelens.store import Experiment
    from tracelens.model.loading import load_model
    from tracelens.testing import make_tokenizer, save_tiny_lora, tiny_hf_model

    folder = tmp_path / "tiny-llama"
    tiny_hf_model("llama").save_pretrained(folder)
    make_tokenizer(bos=True).save_pretrained(folder)
    adapter = save_tiny_lora(tiny_hf_model("llama"), tmp_path / "adapter")
    exp = Experiment.named("exp", tmp_path / "experiments")
    exp.write_config({"base": {"model": str(folder), "lora": None},
                      "lora": {"model": str(folder), "lora": str(adapter)},
                      "broken": {"model": str(folder), "lora": 7}},
                     defaults={"application": "base"}, use_chat_template=False)

    backend = LocalBackend.from_experiment("exp", root=tmp_path / "experiments", device="cpu")
    assert (backend.experiment, backend.variant, backend.use_chat_template) == ("exp", "base", False)
    assert (backend.n_layers, backend.hidden_dim) == (2, 64)
    assert backend.format("Hi") == "Hi"  # config says no chat template
    explicit = LocalBackend.from_experiment("exp", "base", use_chat_template=True, root=tmp_path / "experiments")
    assert explicit.use_chat_template is True and explicit.format("Hi") != "Hi"
    reference = LocalBackend.from_model(cached_tiny("llama").model, use_chat_template=False)
    cfg = GenerationConfig(max_new_tokens=4)
    assert backend.generate(PROMPTS, cfg) == reference.generate(PROMPTS, cfg)
    # The LoRA variant is the base model with its adapter merged, never the base model under its name.
    lora = LocalBackend.from_experiment("exp", "lora", root=tmp_path / "experiments", device="cpu")
    ids = torch.tensor([[1, 20, 30, 40]])
    with torch.no_grad():
        merged = load_model(folder, lora=adapter, device="cpu")(ids)
        assert torch.equal(lora.model(ids), merged) and not torch.allclose(merged, backend.model(ids), atol=0.1)
    with pytest.raises(ValueError, match=r"model_variants.broken.lora must be a non-empty string or null; got 7"):
        LocalBackend.from_experiment("exp", "broken", root=tmp_path / "experiments")
    with pytest.raises(KeyError, match="no model variant"):
        LocalBackend.from_experiment("exp", "nope", root=tmp_path / "experiments")


@pytest.mark.unchecked_types  # `Owner` stands in for the LocalBackend that `_batched` is annotated with
def test_out_of_memory_halves_the_batch_and_keeps_the_order():
    class Owner:
        batch_size = None

    sizes = []

    def run(batch):
        sizes.append(len(batch))
        if len(batch) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return [x * 10 for x in batch]

    owner = Owner()
    assert _batched(list(range(7)), run, 8, owner, "t") == [0, 10, 20, 30, 40, 50, 60]
    assert sizes[:3] == [7, 4, 2] and owner.batch_size == 2
    with pytest.raises(ValueError):
        _batched([1], lambda b: (_ for _ in ()).throw(ValueError("not memory")), 4, owner, "t")


def test_generate_batch_under_per_sample_steering_equals_hf_generate_row_by_row(tiny):
    # the seed's escape hatch: PerSampleSteering around generate_batch(model, tokenizer, prompts, max_new_tokens=...)
    from tracelens import PerSampleSteering, format_prompt, generate_batch
    from tracelens.model.prompts import encode

    from hf_reference import hf_hooks, hf_module_for

    tok, v = tiny.tokenizer, _unit(tiny.model.cfg.d_model, 2)
    prompts = [format_prompt(tok, p) for p in PROMPTS]
    coefs = [4.0, 0.0, -4.0]
    configs = [(0, v, c, (row, row + 1)) for row, c in enumerate(coefs)]
    with PerSampleSteering(tiny.model, configs):
        steered = generate_batch(tiny.model, tok, prompts, max_new_tokens=5)
    plain = generate_batch(tiny.model, tok, prompts, max_new_tokens=5, batch_size=2)
    assert plain[1] == steered[1] and plain[0] != steered[0] and plain[2] != steered[2]
    for prompt, coef, ours in zip(prompts, coefs, steered):
        ids = torch.tensor([encode(tok, prompt)])
        edit = {hf_module_for(tiny.reference, 0, "residual"): lambda h, c=coef: h + (c * v).to(h.dtype)}
        with hf_hooks(tiny.reference, edit), torch.no_grad():
            out = tiny.reference.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
        assert ours == tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
    with pytest.raises(TypeError, match="prompts must be a list of strings, not one string"):
        generate_batch(tiny.model, tok, prompts[0])


def test_per_prompt_steering_rows_equal_each_prompt_alone(tiny):
    """`SteeringSpec.rows` steers only its prompts, also when the call is split into smaller batches."""
    backend = LocalBackend.from_model(tiny.model)
    cfg = GenerationConfig(max_new_tokens=5)
    d = tiny.model.cfg.d_model
    per_prompt = [[SteeringSpec(layer=1, vector=_unit(d, 5), coefficient=6.0)], [], [SteeringSpec(layer=0, vector=_unit(d, 6), coefficient=4.0, component="mlp_out", positions="response")]]
    alone = [backend.generate_with_capture([p], cfg, CaptureSpec([1]), s or None)[0] for p, s in zip(PROMPTS, per_prompt)]
    rows = [SteeringSpec(layer=s.layer, vector=s.vector, coefficient=s.coefficient, component=s.component, positions=s.positions, rows=(i, i + 1))
            for i, specs in enumerate(per_prompt) for s in specs]
    for batch_size in (None, 2):
        backend.batch_size = batch_size
        together = backend.generate_with_capture(PROMPTS, cfg, CaptureSpec([1]), rows)
        assert [r.response_token_ids for r in together] == [r.response_token_ids for r in alone]
        for t, a in zip(together, alone):
            assert (t.response_activations[1]["residual"] - a.response_activations[1]["residual"]).abs().max() <= 1e-5
    assert [r.response_token_ids for r in alone] != [r.response_token_ids for r in backend.generate_results(PROMPTS, cfg)]


@pytest.mark.parametrize("rows", [(1, 1), (-1, 2), (3, 2)])
def test_steering_rows_must_be_a_slice(rows):
    with pytest.raises(ValueError, match=r"rows must be \(start, end\) integers with 0 <= start < end; got"):
        SteeringSpec(layer=0, vector=torch.ones(4), rows=rows)


def test_top_logprobs_are_the_generation_steps_log_softmax(tiny):
    backend = LocalBackend.from_model(tiny.model)
    [r] = backend.generate_results(PROMPTS[:1], GenerationConfig(max_new_tokens=3), top_logprobs=4)
    ids = torch.tensor([r.prompt_token_ids + r.response_token_ids])
    with torch.no_grad():
        logp = torch.log_softmax(tiny.model(ids)[0].float(), dim=-1)
    n = len(r.prompt_token_ids)
    for k, token in enumerate(r.response_token_ids):
        step = logp[n - 1 + k]
        assert abs(r.response_logprobs[k] - step[token].item()) <= 1e-4
        top = torch.topk(step, 4)
        assert [i for i, _ in r.response_top_logprobs[k]] == top.indices.tolist()
        assert r.response_top_logprobs[k][0][0] == token  # greedy: the chosen token is the most likely
    assert backend.generate_results(PROMPTS[:1], GenerationConfig(max_new_tokens=3))[0].response_logprobs is None
