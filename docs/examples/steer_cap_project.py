"""Steering, capping and projection on the default model (the README's example; run by the tests)."""

import torch

import tracelens
from tracelens import (
    ActivationCappingHook,
    HookedGenerator,
    ProjectionHook,
    SteeringHook,
    calibrate_cap_threshold,
    capture_at_position,
    get_hook_path,
)

model = tracelens.load_model("default")  # SmolLM2-135M-Instruct, offline
tok = model.tokenizer
layer = 15
hook = get_hook_path(layer)  # "blocks.15.hook_resid_post"

# A mood direction: difference of mean last-prompt-token activations, happy minus gloomy system prompts.
questions = ["How was your weekend?", "What do you think about Mondays?", "How is the weather?", "Tell me about your job."]
happy = [tracelens.format_prompt(tok, q, "You are overjoyed and cheerful.") for q in questions]
gloomy = [tracelens.format_prompt(tok, q, "You are miserable and gloomy.") for q in questions]
diff = capture_at_position(model, tok, happy, layer, pre_formatted=True).mean(0) - capture_at_position(
    model, tok, gloomy, layer, pre_formatted=True
).mean(0)
direction = diff / diff.norm()

ids, mask = tracelens.tokenize_batch(tok, [tracelens.format_prompt(tok, "How do you feel today?")])
gen = HookedGenerator(model)


def answer() -> str:
    [out] = gen.generate(ids, mask, max_new_tokens=24)
    return tok.decode(out.token_ids, skip_special_tokens=True).strip()


plain = answer()
with SteeringHook(model, direction, hook, coefficient=-60.0):  # push towards gloomy
    steered = answer()

# Per-token projection of the prompt onto the direction (computed inside the hook).
with ProjectionHook(model, direction, hook) as proj, torch.inference_mode():
    model(ids, attention_mask=mask)
scores = proj.get()[0]  # [seq]

# Cap: floor the projection at the 25th percentile seen on the happy prompts, then steer gloomy again.
threshold = calibrate_cap_threshold(model, direction, layer, happy, percentile=25)
with SteeringHook(model, direction, hook, coefficient=-60.0), ActivationCappingHook(
    model, direction, hook, threshold=threshold, mode="floor"
):
    capped = answer()

print(f"plain:   {plain}")
print(f"steered: {steered}")
print(f"capped:  {capped}  (floor at {threshold:.1f})")
print(f"prompt projection: first {scores[0]:.1f}, last {scores[-1]:.1f}")
