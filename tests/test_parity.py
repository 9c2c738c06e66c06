"""The bridge equals the HF model run with the same attention implementation (eager and SDPA) at every
tracelens site, to the bit (fp32 and bf16)."""

import pytest
import torch

from tracelens import COMPONENTS, get_hook_path
from tracelens.model.loading import attention_implementation
from tracelens.model.sites import EAGER_ONLY_HOOKS
from tracelens.testing import tiny_model

from conftest import ATTENTION_CASES, attention_ids, cached_tiny, encode
from hf_reference import hf_capture, hf_module_for

TEXTS = ["The capital of France is Paris.", "I am so happy today, the sun is shining!"]


def _as_hf_shape(tl_act: torch.Tensor, component: str) -> torch.Tensor:
    # TL splits k/v into heads: [batch, pos, n_kv_heads, d_head]; HF's k_proj output is flat.
    return tl_act.flatten(-2) if component in ("k_proj", "v_proj") else tl_act


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("architecture, attn", ATTENTION_CASES, ids=attention_ids)
def test_every_site_and_the_logits_equal_hf_exactly(architecture, attn, dtype):
    t = tiny_model(architecture, n_layers=3, dtype=dtype, attn_implementation=attn)
    assert attention_implementation(t.model) == t.reference.config._attn_implementation == attn
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


def test_resid_post_is_hf_hidden_states_shifted_by_one_except_the_last_layer(tiny_each_attn):
    tiny = tiny_each_attn
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


def test_left_padded_batch_equals_each_row_alone(tiny_each_attn):
    tiny = tiny_each_attn
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


def test_cached_generation_equals_uncached_and_hf_generate_step_logits(tiny_sharp_each_attn):
    """Guards the TL 4.3 / transformers 5.24 KV-cache defect: compare step logits, not tokens."""
    t = tiny_sharp_each_attn
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


@pytest.mark.parametrize("architecture, attn", [c for c in ATTENTION_CASES if c[0] in ("mistral", "gemma2", "gemma3")],
                         ids=attention_ids)
def test_sliding_window_is_honoured_past_the_window(architecture, attn):
    t = cached_tiny(architecture, n_layers=3, init_std=0.2, attn_implementation=attn)
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


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_gemma3_query_and_key_norms_equal_hf(attn):
    t = cached_tiny("gemma3", n_layers=3, attn_implementation=attn)
    ids = t.tokenizer([LONG], return_tensors="pt").input_ids
    paths = [f"model.layers.{l}.self_attn.{n}" for l in range(3) for n in ("q_norm", "k_norm")]
    _, ref = hf_capture(t.reference, ids, paths=paths)
    with torch.no_grad():
        _, cache = t.model.run_with_cache(ids)
    for layer in range(3):
        for name in ("q_norm", "k_norm"):
            assert torch.equal(cache[f"blocks.{layer}.attn.{name}.hook_out"], ref[f"model.layers.{layer}.self_attn.{name}"])


@pytest.mark.parametrize("architecture, attn", ATTENTION_CASES, ids=attention_ids)
def test_the_model_runs_the_attention_kernel_it_was_loaded_with(architecture, attn, monkeypatch):
    t = cached_tiny(architecture, attn_implementation=attn)
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or sdpa(*a, **k))
    ids = t.tokenizer(TEXTS[:1], return_tensors="pt").input_ids
    with torch.no_grad():
        t.model(ids)
    assert len(calls) == (t.model.cfg.n_layers if attn == "sdpa" else 0)


def test_sdpa_fires_every_hook_eager_fires_except_exactly_the_eager_only_ones():
    """`EAGER_ONLY_HOOKS` is what SDPA loses: the check in `resolve_hook_name` misses none and refuses no live hook."""
    lost_anywhere = set()
    for architecture in sorted({a for a, impl in ATTENTION_CASES if impl == "sdpa"}):
        fired = {}
        for attn in ("eager", "sdpa"):
            t = cached_tiny(architecture, attn_implementation=attn)
            ids = t.tokenizer(TEXTS[:1], return_tensors="pt").input_ids
            with torch.no_grad():
                _, cache = t.model.run_with_cache(ids)
            fired[attn] = {name for name in cache if name.startswith("blocks.")}
        lost = {name.split(".", 2)[2] for name in fired["eager"] - fired["sdpa"]}
        assert fired["sdpa"] <= fired["eager"], architecture
        assert lost <= {f"attn.{h}" for h in EAGER_ONLY_HOOKS}, architecture
        lost_anywhere |= lost
    assert lost_anywhere == {f"attn.{h}" for h in EAGER_ONLY_HOOKS}
