"""Interchange: exact round trips, files read back by their own readers, layer conventions against HF."""

from dataclasses import dataclass

import gguf
import numpy as np
import pytest
import torch

from tests.conftest import cached_tiny, encode
from tests.hf_reference import hf_capture, hf_hooks
from tracelens.model.hooks import MultiLayerSteering
from tracelens.pipeline.interchange import export_vector, import_vector


@dataclass
class ControlVector:
    """repeng 0.4.0's `repeng.extract.ControlVector` fields (its module needs numpy<2, so it is not installed)."""

    model_type: str
    directions: dict[int, np.ndarray]


@pytest.fixture
def vectors():
    g = torch.Generator().manual_seed(0)
    return {1: torch.randn(64, generator=g), 3: torch.randn(64, generator=g)}


def _equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("fmt", ["steering_vectors", "repeng", "hidden_states"])
def test_round_trip_through_objects_is_exact(vectors, fmt):
    obj = export_vector(vectors, fmt, model_hint="llama", n_layers=4, cls=ControlVector)
    assert _equal(import_vector(obj), vectors)


def test_round_trip_through_files_is_exact(vectors, tmp_path):
    assert _equal(import_vector(export_vector(vectors, "gguf", tmp_path / "v.gguf", model_hint="llama")), vectors)
    export_vector(vectors, "hidden_states", tmp_path / "v.pt", n_layers=4)
    assert _equal(import_vector(tmp_path / "v.pt"), vectors)


def test_gguf_file_has_llama_cpp_names_shapes_and_metadata(vectors, tmp_path):
    export_vector(vectors, "gguf", tmp_path / "v.gguf", model_hint="llama")
    reader = gguf.GGUFReader(tmp_path / "v.gguf")
    assert reader.get_field("general.architecture").contents() == "controlvector"
    assert reader.get_field("controlvector.model_hint").contents() == "llama"
    assert reader.get_field("controlvector.layer_count").contents() == 2
    got = {t.name: (t.tensor_type, tuple(t.shape), np.array(t.data)) for t in reader.tensors}
    assert sorted(got) == ["direction.1", "direction.3"]
    for layer in (1, 3):
        kind, shape, data = got[f"direction.{layer}"]
        assert kind == gguf.GGMLQuantizationType.F32 and shape == (64,)
        assert np.array_equal(data, vectors[layer].numpy())


def test_gguf_refuses_layer_0_as_llama_cpp_does(vectors, tmp_path):
    with pytest.raises(ValueError, match=r"llama.cpp rejects a control vector for layer 0"):
        export_vector({0: vectors[1]}, "gguf", tmp_path / "v.gguf")


def test_hidden_state_rows_are_shifted_by_one(vectors):
    t = export_vector(vectors, "hidden_states", n_layers=4)
    assert t.shape == (5, 64) and torch.equal(t[2], vectors[1]) and torch.equal(t[4], vectors[3])
    assert not t[0].any() and not t[1].any() and not t[3].any()


def test_bad_inputs_name_the_problem(vectors):
    with pytest.raises(ValueError, match=r"different widths \[32, 64\]"):
        export_vector({1: vectors[1], 2: torch.zeros(32)}, "repeng", cls=ControlVector)
    with pytest.raises(ValueError, match=r"layers \[3\] do not exist in a model with n_layers=3"):
        export_vector(vectors, "hidden_states", n_layers=3)
    with pytest.raises(ValueError, match=r"cannot tell the format of 'v.bin'"):
        import_vector("v.bin")
    with pytest.raises(ValueError, match=r"only decoder_block"):
        import_vector(type("SV", (), {"layer_type": "mlp", "layer_activations": vectors})())


def test_imported_steering_vector_steers_like_steering_vectors_on_the_hf_model():
    t = cached_tiny("llama", n_layers=3)
    g = torch.Generator().manual_seed(1)
    sv = export_vector({0: torch.randn(64, generator=g), 1: torch.randn(64, generator=g)}, "steering_vectors")
    ids, mask = encode(t.tokenizer, ["How do you feel today?", "Paris is lovely"])
    with torch.no_grad(), sv.apply(t.reference, multiplier=2.0):
        expected = t.reference(ids, attention_mask=mask).logits
    imported = import_vector(sv)
    with MultiLayerSteering(t.model, [(l, v, 2.0) for l, v in imported.items()]), torch.no_grad():
        got = t.model(ids, attention_mask=mask)
    real = mask.bool()
    assert torch.allclose(got[real], expected[real], atol=1e-5)
    with torch.no_grad():
        plain = t.model(ids, attention_mask=mask)
    assert (plain[real] - expected[real]).abs().max() > 1e-2  # the steering matters


def test_repeng_and_hidden_state_reads_are_tracelens_layers():
    """repeng and persona-vector files read `hidden_states[K + 1]` for block K: the residual after block K."""
    t = cached_tiny("llama", n_layers=3)
    ids, mask = encode(t.tokenizer, ["How do you feel today?"])
    with torch.no_grad():
        hidden = t.reference(ids, attention_mask=mask, output_hidden_states=True).hidden_states
    _, outputs = hf_capture(t.reference, ids, mask, [f"model.layers.{k}" for k in range(3)])
    for k in range(2):  # the last block's hidden state is after the final norm
        assert torch.equal(hidden[k + 1], outputs[f"model.layers.{k}"])
    with hf_hooks(t.reference, {}):
        _, cache = t.model.run_with_cache(ids, attention_mask=mask)
    assert torch.equal(cache["blocks.1.hook_resid_post"], hidden[2])
