"""The seed's snippets run as written on a `load_model` model: HF call forms, `tau`, `from_experiment(device=...)`,
plain-HF-model errors, and `HookedGenerator(steer_prompt=False)` (the original's steering from the first generated
token). `memory_stats` and `capture_at_position(pool='none')` are covered in test_vram.py and test_capture.py."""

import pytest
import torch

from conftest import cached_tiny
from hf_reference import hf_hooks, hf_module_for
from tracelens import (
    ActivationCappingHook,
    CaptureConfig,
    CaptureHook,
    HookedGenerator,
    InputTypeError,
    MultiLayerCapture,
    SteeringConfig,
    SteeringHook,
    load_model,
)
from tracelens.model.requests import Condition
from tracelens.store import Experiment
from tracelens.serving.backends import LocalBackend
from tracelens.testing import make_tokenizer, tiny_hf_model

PROMPTS = ["The capital of France is", "I am so happy today, the sun is shining and"]


def _inputs(t, token_type_ids: bool = False):
    """A tokenizer's left-padded output, as the seed builds `inputs` (optionally with all-zero token_type_ids)."""
    inputs = dict(t.model.tokenizer(PROMPTS, return_tensors="pt", padding=True, padding_side="left"))
    assert (inputs["attention_mask"] == 0).any()  # the batch really is padded
    if token_type_ids:
        inputs["token_type_ids"] = torch.zeros_like(inputs["input_ids"])
    return inputs


@pytest.fixture(scope="module")
def tiny_sharp_llama_pair():
    """The Llama `tiny_sharp` case alone (model, reference), for tests that need one sensitive model."""
    t = cached_tiny("llama", init_std=0.2)
    return t.model, t.reference


def _unit(d, seed=0):
    v = torch.randn(d, generator=torch.Generator().manual_seed(seed))
    return v / v.norm()


# --- model(**inputs) and model.generate(**inputs) ------------------------------------------------------------------


@pytest.mark.parametrize("token_type_ids", [False, True])
def test_hf_forward_form_returns_the_hf_models_output(tiny_sharp, token_type_ids):
    t = tiny_sharp
    with torch.no_grad():
        out = t.model(**_inputs(t, token_type_ids))
        expected = t.reference(**_inputs(t)).logits
    assert torch.equal(out.logits, expected)  # to the bit: it is the HF forward


def test_hf_generate_form_is_greedy_like_hf_and_honours_left_padding(tiny_sharp):
    t = tiny_sharp
    inputs = _inputs(t)
    width = inputs["input_ids"].shape[1]
    out = t.model.generate(**_inputs(t, token_type_ids=True), max_new_tokens=6)
    assert torch.equal(out, t.reference.generate(**inputs, max_new_tokens=6, do_sample=False))
    assert out.shape == (2, width + 6) and torch.equal(out[:, :width], inputs["input_ids"])
    short = t.model.tokenizer(PROMPTS[:1], return_tensors="pt")  # the padded row, alone and unpadded
    alone = t.model.generate(**short, max_new_tokens=6)
    n = int(inputs["attention_mask"][0].sum())
    assert torch.equal(out[0, width - n:], alone[0])


def test_hf_generate_samples_only_with_do_sample(tiny_sharp_llama_pair):
    model, reference = tiny_sharp_llama_pair
    inputs = dict(model.tokenizer(PROMPTS, return_tensors="pt", padding=True, padding_side="left"))
    torch.manual_seed(0)
    sampled = model.generate(**inputs, max_new_tokens=8, do_sample=True)
    torch.manual_seed(0)
    assert torch.equal(sampled, reference.generate(**inputs, max_new_tokens=8, do_sample=True))
    assert not torch.equal(sampled, model.generate(**inputs, max_new_tokens=8))


def test_transformerlens_call_forms_are_unchanged(tiny_llama):
    t = tiny_llama
    inputs = _inputs(t)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    with torch.no_grad():
        logits = t.model(ids)
        assert isinstance(logits, torch.Tensor) and torch.equal(logits, t.reference(ids).logits)
        masked = t.model(ids, attention_mask=mask)
        assert isinstance(masked, torch.Tensor) and masked.shape == logits.shape
        assert t.model(ids, return_type="loss").dim() == 0
        _, cache = t.model.run_with_cache(ids, names_filter="blocks.0.hook_resid_post")
        assert torch.equal(cache["blocks.0.hook_resid_post"], t.reference(ids, output_hidden_states=True).hidden_states[1])
    out = t.model.generate(ids[:1], max_new_tokens=3, do_sample=False, verbose=False)
    assert isinstance(out, torch.Tensor) and out.shape == (1, ids.shape[1] + 3)
    assert isinstance(t.model.generate("The capital", max_new_tokens=2, verbose=False), str)


def test_hooks_fire_inside_the_hf_forms(tiny_llama):
    t = tiny_llama
    inputs = _inputs(t)
    with CaptureHook(t.model, "model.layers.0") as hook, torch.no_grad():  # not the last layer: HF norms that one
        t.model(**inputs)
        expected = t.reference(**inputs, output_hidden_states=True).hidden_states[1]
    assert torch.equal(hook.get(), expected)
    v = _unit(t.model.cfg.d_model)
    with SteeringHook(t.model, v, "model.layers.0", coefficient=8.0):
        steered = t.model.generate(**inputs, max_new_tokens=5)
    with hf_hooks(t.reference, {hf_module_for(t.reference, 0, "residual"): lambda h: h + 8.0 * v}):
        assert torch.equal(steered, t.reference.generate(**inputs, max_new_tokens=5, do_sample=False))
    assert not torch.equal(steered, t.model.generate(**inputs, max_new_tokens=5))


# --- ActivationCappingHook(tau=...) --------------------------------------------------------------------------------


def test_capping_takes_tau_as_the_original_spelled_it(tiny_llama):
    m = tiny_llama.model
    ids = _inputs(tiny_llama)["input_ids"]
    v = _unit(m.cfg.d_model)
    with torch.no_grad():
        with ActivationCappingHook(m, v, "model.layers.0", threshold=0.5):
            by_threshold = m(ids)
        with ActivationCappingHook(m, v, "model.layers.0", tau=0.5):
            by_tau = m(ids)
        with ActivationCappingHook(m, v, "model.layers.0", tau=-0.5):
            other = m(ids)
    assert torch.equal(by_tau, by_threshold) and not torch.equal(by_tau, other)
    assert ActivationCappingHook(m, v, "model.layers.0", tau=0.5, mode="ceiling").threshold == 0.5
    with pytest.raises(ValueError, match=r"exactly one of threshold and tau .*got threshold=0.5, tau=0.5"):
        ActivationCappingHook(m, v, "model.layers.0", threshold=0.5, tau=0.5)
    with pytest.raises(ValueError, match=r"got threshold=None, tau=None"):
        ActivationCappingHook(m, v, "model.layers.0")


# --- LocalBackend.from_experiment(exp, device="auto") --------------------------------------------------------------


def test_from_experiment_loads_the_variant_on_the_default_device(tmp_path):
    folder = tmp_path / "tiny"
    tiny_hf_model("llama", n_layers=3).save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    exp = Experiment.named("exp", tmp_path / "experiments")
    exp.write_config({"base": {"model": str(folder)}}, defaults={"application": "base"})
    default = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for given in ("exp", exp):
        backend = LocalBackend.from_experiment(given, device="auto", root=tmp_path / "experiments")
        assert (backend.experiment, backend.variant, backend.n_layers) == ("exp", "base", 3)
        assert backend.device.type == default.type
    seed_order = LocalBackend.from_experiment(exp, "base", "cpu", False, attn_implementation="eager")
    assert seed_order.device == torch.device("cpu") and seed_order.use_chat_template is False
    assert seed_order.model.original_model.config._attn_implementation == "eager"


# --- a plain HF model where a tracelens model is needed -------------------------------------------------------------


def test_a_plain_hf_model_is_refused_with_the_fix_in_one_line():
    hf, tok = tiny_hf_model("llama"), make_tokenizer()
    v = torch.ones(hf.config.hidden_size)
    message = r"^model must be a tracelens model, so wrap it with tracelens.load_model\(model, tokenizer\); got a plain LlamaForCausalLM$"
    for make in (lambda: SteeringHook(hf, v, "model.layers.0"), lambda: MultiLayerCapture(hf, layers=[0]),
                 lambda: CaptureHook(hf, "model.layers.0"), lambda: LocalBackend.from_model(hf, tok)):
        with pytest.raises(InputTypeError, match=message):
            make()
    with SteeringHook(load_model(hf, tok), v, "model.layers.0"):  # the advice works
        pass


# --- HookedGenerator(steer_prompt=False): the original's steering ---------------------------------------------------


def _skip_first_call(fn):
    """An HF edit that skips the first forward call (the prompt), as the original registered its hooks after it."""
    calls = []

    def edit(h):
        calls.append(h.shape[1])
        return None if len(calls) == 1 else fn(h)

    return edit, calls


@pytest.mark.parametrize("use_cache", [True, False])
def test_steer_prompt_false_leaves_the_prompt_pass_unsteered(tiny_sharp_llama_pair, use_cache):
    model, reference = tiny_sharp_llama_pair
    inputs = dict(model.tokenizer(PROMPTS, return_tensors="pt", padding=True, padding_side="left"))
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    v = _unit(model.cfg.d_model, 1)
    steering = [SteeringConfig(vector=v, layer=0, coefficient=8.0)]
    original = HookedGenerator(model, steer_prompt=False)
    got = original.generate(ids, mask, max_new_tokens=5, steering=steering, stop_at_eos=False, output_logits=True,
                            use_cache=use_cache)
    plain = HookedGenerator(model).generate(ids, mask, max_new_tokens=5, stop_at_eos=False, output_logits=True)
    prompt_steered = HookedGenerator(model).generate(ids, mask, max_new_tokens=5, steering=steering, stop_at_eos=False)
    edit, calls = _skip_first_call(lambda h: h + 8.0 * v)
    with hf_hooks(reference, {hf_module_for(reference, 0, "residual"): edit}):
        hf = reference.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, eos_token_id=None,
                                output_logits=True, return_dict_in_generate=True)
    assert calls[0] == ids.shape[1] and set(calls[1:]) == {1}  # the reference did skip exactly the prompt pass
    for r in range(2):
        assert got[r].token_ids == hf.sequences[r, ids.shape[1]:].tolist()
        assert torch.allclose(got[r].logits, torch.stack([step[r] for step in hf.logits]), atol=1e-4)
        assert torch.equal(got[r].logits[0], plain[r].logits[0])  # token 0 comes from the unsteered prompt pass
        assert not torch.allclose(got[r].logits[1], plain[r].logits[1], atol=1e-2)  # later ones are steered
    assert [o.token_ids for o in got] != [o.token_ids for o in prompt_steered]  # the default steers the prompt too


def test_steer_prompt_false_keeps_prompt_captures_unsteered_and_refuses_conditions(tiny_llama):
    m = tiny_llama.model
    inputs = _inputs(tiny_llama)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    v = _unit(m.cfg.d_model, 2)
    kw = dict(max_new_tokens=3, capture=CaptureConfig(layers=[1]), stop_at_eos=False)
    for positions in ("all", "response"):
        steering = [SteeringConfig(vector=v, layer=0, coefficient=8.0, positions=positions)]
        got = HookedGenerator(m, steer_prompt=False).generate(ids, mask, steering=steering, **kw)
        plain = HookedGenerator(m).generate(ids, mask, **kw)
        for g, p in zip(got, plain):
            first, rest = g.activations[1]["residual"][0], g.activations[1]["residual"][1:]
            assert torch.equal(first, p.activations[1]["residual"][0])  # the prompt pass's last position
            assert g.token_ids[0] == p.token_ids[0]
            assert not torch.allclose(rest, p.activations[1]["residual"][1:], atol=1e-2)  # decode steps are steered
    conditional = SteeringConfig(vector=v, layer=1, coefficient=1.0, condition=Condition(v, 0, 0.0))
    with pytest.raises(ValueError, match=r"steer_prompt=False must be used with steering that has no condition"):
        HookedGenerator(m, steer_prompt=False).generate(ids, mask, max_new_tokens=2, steering=[conditional])
