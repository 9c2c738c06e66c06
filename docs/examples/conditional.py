"""Conditional steering: steer only prompts about food (run by the tests)."""

import torch

import tracelens
from tracelens import HookedGenerator, capture_at_position
from tracelens.model.conditional import ConditionalSteering, fit_condition_threshold

model = tracelens.load_model("default")
tok = model.tokenizer
food = ["What should I cook tonight?", "Is pasta healthy?", "How do I bake bread?", "What goes well with rice?"]
other = ["How do I fix a flat tyre?", "What is the capital of Peru?", "How do I learn to swim?", "Why is the sky blue?"]
layer = 12
condition = capture_at_position(model, tok, food, layer).mean(0) - capture_at_position(model, tok, other, layer).mean(0)
fit = fit_condition_threshold(model, condition, layer, food, other)  # threshold on <h, c/|c|> at the last prompt token
print(f"threshold {fit.threshold:.2f} ({fit.comparator}), accuracy on the fitting prompts {fit.accuracy:.2f}")

happy = [tracelens.format_prompt(tok, "How are you?", "You are overjoyed.")]
gloomy = [tracelens.format_prompt(tok, "How are you?", "You are miserable.")]
mood = capture_at_position(model, tok, gloomy, 15, pre_formatted=True)[0] - capture_at_position(
    model, tok, happy, 15, pre_formatted=True)[0]

prompts = ["What should I have for breakfast?", "How do I change a light bulb?"]
ids, mask = tracelens.tokenize_batch(tok, [tracelens.format_prompt(tok, p) for p in prompts])
with ConditionalSteering(model, mood, 15, condition, layer, fit.threshold, fit.comparator, coefficient=4.0) as steer:
    outs = HookedGenerator(model).generate(ids, mask, max_new_tokens=20)
for prompt, passed, out in zip(prompts, steer.gate.tolist(), outs):
    print(f"{'steered' if passed else 'plain  '} | {prompt} -> {tok.decode(out.token_ids, skip_special_tokens=True)!r}")
gate = steer.gate
