"""Hook-site naming, layer checks, contribution detection and HF module-path translation."""

import re

import pytest
import torch

from tracelens import COMPONENTS, CaptureHook, detect_contribution_paths, get_hook_path, resolve_hook_name
from tracelens.model.sites import ContributionPath

from conftest import cached_tiny
from hf_reference import hf_capture, hf_module_for


def test_get_hook_path_maps_each_component_to_its_tl_hook():
    assert get_hook_path(16) == "blocks.16.hook_resid_post"
    assert get_hook_path(16, "attn_contribution") == "blocks.16.hook_attn_out"
    assert get_hook_path(16, "mlp_contribution") == "blocks.16.hook_mlp_out"
    assert get_hook_path(16, "attn_out") == "blocks.16.attn.hook_out"
    assert get_hook_path(16, "mlp_out") == "blocks.16.mlp.hook_out"
    assert get_hook_path(16, "k_proj") == "blocks.16.attn.hook_k"
    assert get_hook_path(16, "v_proj") == "blocks.16.attn.hook_v"


def test_unknown_component_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown component 'resid'; valid components: residual, attn_contribution"):
        get_hook_path(0, "resid")


@pytest.mark.unchecked_types
def test_layers_are_range_checked_and_negative_layers_count_from_the_end(tiny):
    n = tiny.model.cfg.n_layers
    assert get_hook_path(-1, model=tiny.model) == f"blocks.{n - 1}.hook_resid_post"
    assert get_hook_path(-n, model=tiny.model) == "blocks.0.hook_resid_post"
    with pytest.raises(ValueError, match=rf"layer {n} is out of range for a model with {n} layers \(valid: 0..{n - 1}"):
        get_hook_path(n, model=tiny.model)
    with pytest.raises(ValueError, match=rf"layer -{n + 1} is out of range"):
        get_hook_path(-n - 1, model=tiny.model)
    with pytest.raises(ValueError, match="negative layer -1 needs model="):
        get_hook_path(-1)
    with pytest.raises(TypeError, match="layer must be an int; got str"):
        get_hook_path("3")


def test_detect_contribution_paths_names_the_module_and_the_hook(tiny):
    paths = detect_contribution_paths(tiny.model)
    expected = {
        "gemma2": ("post_attention_layernorm", "post_feedforward_layernorm"),
        "gemma3": ("post_attention_layernorm", "post_feedforward_layernorm"),
    }.get(tiny.architecture, ("self_attn.o_proj", "mlp.down_proj"))
    assert (paths["attn_contribution"], paths["mlp_contribution"]) == expected
    assert paths["attn_contribution"].hook == "blocks.{layer}.hook_attn_out"
    assert paths["mlp_contribution"].hook == "blocks.{layer}.hook_mlp_out"
    # The same answer from the untouched HF model.
    assert detect_contribution_paths(tiny.reference) == paths


def test_detect_contribution_paths_rejects_an_unknown_architecture():
    class Weird(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = torch.nn.Module()
            self.model.layers = torch.nn.ModuleList([torch.nn.Module()])
            self.model.layers[0].weird_module = torch.nn.Linear(2, 2)

    with pytest.raises(ValueError, match=r"Weird: its first decoder layer has children \['weird_module'\]"):
        detect_contribution_paths(Weird())


def test_contribution_path_is_the_seeds_string():
    p = ContributionPath("self_attn.o_proj", "blocks.{layer}.hook_attn_out")
    assert f"model.layers.3.{p}" == "model.layers.3.self_attn.o_proj"
    assert p.module == "self_attn.o_proj"


def test_hf_module_paths_translate_to_hooks_holding_the_same_activation(tiny):
    """Every HF module path the original accepted resolves to a TL hook whose value equals that module's output."""
    layer = 1
    modules = {c: hf_module_for(tiny.reference, layer, c) for c in COMPONENTS}
    hooks = {c: resolve_hook_name(tiny.model, m) for c, m in modules.items()}
    assert hooks["residual"] == get_hook_path(layer)
    ids = tiny.tokenizer(["The capital of France is Paris."], return_tensors="pt").input_ids
    _, ref = hf_capture(tiny.reference, ids, paths=modules.values())
    with torch.no_grad():
        _, cache = tiny.model.run_with_cache(ids, names_filter=list(hooks.values()))
    for c, module in modules.items():
        # TL splits k/v into heads: [batch, pos, n_kv_heads, d_head]; HF's k_proj output is flat.
        act = cache[hooks[c]].flatten(-2) if c in ("k_proj", "v_proj") else cache[hooks[c]]
        assert torch.equal(act, ref[module]), (c, module, hooks[c])
        assert tiny.model.hook_dict[hooks[c]] is tiny.model.hook_dict[get_hook_path(layer, c)], c


def test_gemma2_contribution_modules_translate_to_the_contribution_hooks():
    from tracelens.testing import tiny_model

    model = tiny_model("gemma2").model
    hook_dict = model.hook_dict
    for module, alias in [
        ("model.layers.1.post_attention_layernorm", "blocks.1.hook_attn_out"),
        ("model.layers.1.post_feedforward_layernorm", "blocks.1.hook_mlp_out"),
    ]:
        assert hook_dict[resolve_hook_name(model, module)] is hook_dict[alias]


def test_tl_names_pass_through_and_unknown_paths_are_rejected(tiny):
    assert resolve_hook_name(tiny.model, "blocks.0.hook_resid_post") == "blocks.0.hook_resid_post"
    with pytest.raises(ValueError, match=r"unknown hook point 'blocks.0.hook_resid_pst'.*did you mean blocks.0.hook_resid_post"):
        resolve_hook_name(tiny.model, "blocks.0.hook_resid_pst")
    with pytest.raises(ValueError, match=r"HF module path 'model.layers.0.self_attn.nope'.*has no child 'nope'"):
        resolve_hook_name(tiny.model, "model.layers.0.self_attn.nope")
    with pytest.raises(ValueError, match=r"has no child '99'"):
        resolve_hook_name(tiny.model, "model.layers.99")


def test_other_wrapped_hf_modules_map_to_their_components_hook_out(tiny):
    # Llama's post_attention_layernorm is the pre-MLP norm (ln2); Gemma-2's is the attention post-norm.
    hook = resolve_hook_name(tiny.model, "model.layers.0.input_layernorm")
    assert hook == "blocks.0.ln1.hook_out"


def test_attention_pattern_hooks_on_an_sdpa_model_say_to_load_with_eager():
    sdpa = cached_tiny("llama", attn_implementation="sdpa").model
    for name in ("blocks.0.attn.hook_pattern", "blocks.1.attn.hook_attn_scores", "blocks.0.attn.hook_rot_k"):
        with pytest.raises(ValueError, match=rf"hook point '{re.escape(name)}' must be hooked on a model loaded with "
                                             r"attn_implementation='eager'; got a model running 'sdpa' attention"):
            resolve_hook_name(sdpa, name)
    with pytest.raises(ValueError, match=r"load_model\(\.\.\., attn_implementation='eager'\)"):
        CaptureHook(sdpa, "blocks.0.attn.hook_pattern")
    assert resolve_hook_name(sdpa, "blocks.0.attn.hook_k") == "blocks.0.attn.hook_k"


def test_attention_pattern_hooks_on_an_eager_model_capture_the_pattern():
    t = cached_tiny("llama", attn_implementation="eager")
    ids = t.tokenizer(["The capital of France is Paris."], return_tensors="pt").input_ids
    with CaptureHook(t.model, "blocks.0.attn.hook_pattern") as cap, torch.no_grad():
        t.model(ids)
    pattern = cap.get()
    assert pattern.shape == (1, t.model.cfg.n_heads, ids.shape[1], ids.shape[1])
    assert torch.allclose(pattern.sum(-1), torch.ones(()))
