"""Move a vector to llama.cpp (GGUF) and steering-vectors and back (run by the tests)."""

import tempfile
from pathlib import Path

import torch

import tracelens
from tracelens import MultiLayerSteering, capture_at_position
from tracelens.pipeline.interchange import export_vector, import_vector

model = tracelens.load_model("default")
tok = model.tokenizer
happy = [tracelens.format_prompt(tok, q, "You are overjoyed.") for q in ["How are you?", "How was work?"]]
gloomy = [tracelens.format_prompt(tok, q, "You are miserable.") for q in ["How are you?", "How was work?"]]
layers = [10, 15]
diff = capture_at_position(model, tok, happy, layers, pre_formatted=True).mean(0) - capture_at_position(
    model, tok, gloomy, layers, pre_formatted=True).mean(0)  # [2, d]
vectors = {layer: diff[i] for i, layer in enumerate(layers)}  # tracelens layer L = blocks.L.hook_resid_post

path = export_vector(vectors, "gguf", Path(tempfile.mkdtemp()) / "mood.gguf", model_hint="llama")
# llama.cpp: llama-cli -m SmolLM2-135M-Instruct.gguf --control-vector-scaled mood.gguf 1.0
from_gguf = import_vector(path)  # GGUF direction.K is block K: the same layer numbers
sv = export_vector(vectors, "steering_vectors")  # SteeringVector(layer_activations={10: ..., 15: ...})
ids, mask = tracelens.tokenize_batch(tok, [tracelens.format_prompt(tok, "How do you feel?")])
with MultiLayerSteering(model, [(l, v, 1.0) for l, v in from_gguf.items()]), torch.inference_mode():
    steered = model(ids, attention_mask=mask)[0, -1]
print(f"GGUF round trip exact: {all(torch.equal(from_gguf[l], vectors[l]) for l in layers)}; "
      f"steering-vectors layers {sorted(sv.layer_activations)}; steered top token {tok.decode(steered.argmax())!r}")
