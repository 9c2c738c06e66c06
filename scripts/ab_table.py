"""Render an A/B report (report.json written by `tracelens ab`) as a Markdown table, and redraw its SVG.

    python scripts/ab_table.py docs/ab/report.json --md docs/ab/propensity.md --svg docs/ab/propensity.svg
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tracelens.pipeline.ab_plot import propensity_svg
from tracelens.metrics import Estimate


def render(report: dict) -> str:
    """Markdown: the setup, then one row per layer (detection, curve ends, effect and its random control)."""
    mults = report["multipliers"]
    est = Estimate.from_dict
    lines = [
        f"A/B propensity on `{Path(report['dataset']).name}`: {report['n_questions']} questions (matching letters "
        f"{report['letter_balance']}), split by question {report['splits']} (train balanced to {report['train_letters']} by matching letter), method `{report['method']}` read at the "
        f"answer {report['read']}. p(match) = p(matching letter) / (p(A) + p(B)) at the position before the letter, "
        f"mean over the {report['splits']['test']} test questions, 95% bootstrap intervals over questions. Multiplier 1 "
        "adds the train mean difference along the direction; the control is a random direction of the same norm.",
        "",
        f"Unsteered: p(match) {est(report['unsteered']['p_match']):.3f}; probability mass on the two letters "
        f"{est(report['unsteered']['mass']):.3f}.",
        "",
        f"| layer | test AUROC | random AUROC 5-95% | p(match) at {mults[0]:g} | p(match) at {mults[-1]:g} | "
        f"effect ({mults[-1]:g} vs {mults[0]:g}) | control effect | questions moved up |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for layer, e in report["layers"].items():
        chance = e["chance"]["auroc"]
        lines.append(
            f"| {layer} | {est(e['detection']['test']['auroc']):.3f} | {chance['lo']:.3f}-{chance['hi']:.3f} | "
            f"{est(e['curve'][0]['p_match']):.3f} | {est(e['curve'][-1]['p_match']):.3f} | {est(e['effect']):.3f} | "
            f"{est(e['control_effect']):.3f} | {e['steerable']:.0%} |")
    curve_rows = ["", "Full curves (p(match), vector / control):", "",
                  "| layer | " + " | ".join(f"{m:g}" for m in mults) + " |", "|---" * (len(mults) + 1) + "|"]
    for layer, e in report["layers"].items():
        cells = [f"{a['p_match']['value']:.3f} / {b['p_match']['value']:.3f}" for a, b in zip(e["curve"], e["control"])]
        curve_rows.append(f"| {layer} | " + " | ".join(cells) + " |")
    return "\n".join(lines + curve_rows) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report", type=Path)
    parser.add_argument("--md", type=Path, required=True)
    parser.add_argument("--svg", type=Path)
    args = parser.parse_args()
    report = json.loads(args.report.read_text())
    args.md.write_text(render(report))
    if args.svg:
        args.svg.write_text(propensity_svg(report))


if __name__ == "__main__":
    main()
