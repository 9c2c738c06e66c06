"""The bridge equals the eager HF model at every tracelens site, to the bit (fp32 and bf16)."""

import pytest
import torch

from tracelens import COMPONENTS, get_hook_path
from tracelens.testing import ARCHITECTURES, tiny_model

from conftest import cached_tiny, encode
from hf_reference import hf_capture, hf_module_for

TEXTS = ["The capital of France is Paris.", "I am so happy today, the sun is shining!"]


def _as_hf_shape(tl_act: torch.Tensor, component: str) -> torch.Tensor:
    # TL splits k/v into heads: [batch, pos, n_kv_heads, d_head]; HF's k_proj output is flat.
    return tl_act.flatten(-2) if component in ("k_proj", "v_proj") else tl_act


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_every_site_and_the_logits_equal_hf_exactly(architecture, dtype):
    t = tiny_model(architecture, n_layers=3, dtype=dtype)
    ids = t.tokenizer(TEXTS[:1], return_tensors="pt").input_ids
    n_layers = t.model.cfg.n_layers
    sites = {get_hook_path(l, c): hf_module_for(t.reference, l, c) for l in range(n_layers) for c in COMPONENTS}
    ref_logits, ref_acts = hf_capture(t.reference, ids, paths=sites.values())
    with torch.no_grad():
        logits, cache = t.model.run_with_cache(ids)
    assert logits.dtype == dtype
    assert torch.equal(logits, ref_logits)
    for hook, module in sites.items():
        component = next(c for c in COMPONENTS if get_hook_path(int(hook.split(".")[1]), c) == hook)
        assert torch.equal(_as_hf_shape(cache[hook], component), ref_acts[module]), (hook, module)


def test_resid_post_is_hf_hidden_states_shifted_by_one_except_the_last_layer(tiny):
    ids = tiny.tokenizer(TEXTS[:1], return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = tiny.reference(ids, output_hidden_states=True).hidden_states
        _, cache = tiny.model.run_with_cache(ids)
    n_layers = tiny.model.cfg.n_layers
    for layer in range(n_layers - 1):
        assert torch.equal(cache[get_hook_path(layer)], hidden[layer + 1])
    # HF's last hidden state is after the final norm; TL's last resid_post is before it.
    assert torch.equal(cache["ln_final.hook_out"], hidden[n_layers])
    assert not torch.allclose(cache[get_hook_path(n_layers - 1)], hidden[n_layers])


def test_left_padded_batch_equals_each_row_alone(tiny):
    ids, mask = encode(tiny.tokenizer, TEXTS)
    assert (mask[0] == 0).any(), "the first text must be padded for this test to mean anything"
    hooks = [get_hook_path(l, c) for l in range(tiny.model.cfg.n_layers) for c in ("residual", "attn_contribution")]
    with torch.no_grad():
        batch_logits, batch = tiny.model.run_with_cache(ids, attention_mask=mask, names_filter=hooks)
        for row, text in enumerate(TEXTS):
            alone_ids = tiny.tokenizer([text], return_tensors="pt").input_ids
            n = alone_ids.shape[1]
            logits, alone = tiny.model.run_with_cache(alone_ids, names_filter=hooks)
            assert (batch_logits[row, -n:] - logits[0]).abs().max() <= 1e-5
            for hook in hooks:
                assert (batch[hook][row, -n:] - alone[hook][0]).abs().max() <= 1e-5, hook


def test_cached_generation_equals_uncached_and_hf_generate_step_logits(tiny_sharp):
    """Guards the TL 4.3 / transformers 5.24 KV-cache defect: compare step logits, not tokens."""
    t = tiny_sharp
    ids = t.tokenizer(TEXTS[:1], return_tensors="pt").input_ids
    steps = 8
    with torch.no_grad():
        hf = t.reference.generate(
            ids, max_new_tokens=steps, do_sample=False, output_logits=True, return_dict_in_generate=True,
            min_new_tokens=steps, pad_token_id=t.tokenizer.pad_token_id,
        )
        hf_logits = torch.stack(hf.logits, dim=1)
        runs = {}
        for cached in (True, False):
            out = t.model.generate(
                ids, max_new_tokens=steps, do_sample=False, use_past_kv_cache=cached, stop_at_eos=False,
                output_logits=True, verbose=False, return_type="tokens",
            )
            runs[cached] = (out.sequences, torch.stack(out.logits, dim=1))
    for tokens, logits in runs.values():
        assert torch.equal(tokens, hf.sequences)
        assert (logits - hf_logits).abs().max() <= 1e-4
    assert (runs[True][1] - runs[False][1]).abs().max() <= 1e-4


LONG = " ".join(TEXTS * 18)  # about 240 tokens: over 3 times every tiny model's sliding window (8 or 64)


@pytest.mark.parametrize("architecture", ["mistral", "gemma2", "gemma3"])
def test_sliding_window_is_honoured_past_the_window(architecture):
    t = cached_tiny(architecture, n_layers=3, init_std=0.2)
    ids = t.tokenizer([LONG], return_tensors="pt").input_ids
    assert ids.shape[1] > 3 * t.reference.config.sliding_window
    with torch.no_grad():
        logits = t.model(ids)
        assert torch.equal(logits, t.reference(ids).logits)
        window = t.reference.config.sliding_window
        t.reference.config.sliding_window = 10**6  # the same weights attending to everything
        try:
            unwindowed = t.reference(ids).logits
        finally:
            t.reference.config.sliding_window = window
    assert (logits[0, window:] - unwindowed[0, window:]).abs().max() > 1e-3, "the window must matter at this length"
    assert torch.equal(logits[0, :window], unwindowed[0, :window])


def test_gemma3_query_and_key_norms_equal_hf():
    t = cached_tiny("gemma3", n_layers=3)
    ids = t.tokenizer([LONG], return_tensors="pt").input_ids
    paths = [f"model.layers.{l}.self_attn.{n}" for l in range(3) for n in ("q_norm", "k_norm")]
    _, ref = hf_capture(t.reference, ids, paths=paths)
    with torch.no_grad():
        _, cache = t.model.run_with_cache(ids)
    for layer in range(3):
        for name in ("q_norm", "k_norm"):
            assert torch.equal(cache[f"blocks.{layer}.attn.{name}.hook_out"], ref[f"model.layers.{layer}.self_attn.{name}"])
