"""A/B propensity curve on the default model: a small run on 24 starter questions (run by the tests)."""

import tracelens
from tracelens.pipeline.ab import ABConfig, ABDataset, load_ab, run_ab
from tracelens.metrics import Estimate

model = tracelens.load_model("default")  # SmolLM2-135M-Instruct, offline
starter = load_ab("optimism")  # 80 questions, CAA layout
print(f"{len(starter)} questions, matching letters {starter.letter_balance()}")
small = ABDataset(starter.items[:24], starter.path)  # a quick subset; use all of `starter` for real numbers
result = run_ab(model, small, ABConfig(layers=[15], multipliers=(-2.0, 2.0), n_random=20))
entry = result.report["layers"]["15"]
for point, control in zip(entry["curve"], entry["control"]):
    print(f"multiplier {point['multiplier']:+g}: p(match) {Estimate.from_dict(point['p_match']):.3f}, "
          f"random direction {Estimate.from_dict(control['p_match']):.3f}")
