"""An A/B report (`tracelens.pipeline.ab.run_ab`) drawn and written up: `propensity_svg`, the propensity curves as a
standalone SVG (no plotting dependency), and `propensity_markdown`, the table with its result stated from the
numbers (`ab_verdict`).

One panel per layer: p(matching letter) against the multiplier for the vector (blue, solid) and the
random control of the same norm (grey, dashed), 95% bootstrap intervals as whiskers, the unsteered
point (black) and 0.5 (dotted). Every point carries its numbers as `data-*` attributes.
"""

from __future__ import annotations

from html import escape

from tracelens.metrics import Estimate
from tracelens.provenance import _code, provenance_lines

PANEL_W, PANEL_H, MARGIN, COLUMNS = 220, 170, 34, 4
STYLES = {"curve": ("#1f5fbf", ""), "control": ("#888888", "4 3")}


def propensity_svg(report: dict, title: str | None = None) -> str:
    """The SVG text for `report` (as written by `tracelens.pipeline.ab.run_ab`)."""
    layers = list(report["layers"])
    mults = report["multipliers"]
    lo_m, hi_m = mults[0], mults[-1]
    rows = (len(layers) + COLUMNS - 1) // COLUMNS
    width, height = COLUMNS * PANEL_W + 20, rows * PANEL_H + 60
    title = title or (f"A/B propensity, {report['n_questions']} questions ({report['splits']['test']} test), "
                      f"{report['method']}; blue: vector, grey dashed: random control")
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="10">',
           f'<rect width="{width}" height="{height}" fill="white"/>',
           f'<text x="10" y="18" font-size="12">{escape(title)}</text>']
    for n, layer in enumerate(layers):
        ox, oy = 10 + (n % COLUMNS) * PANEL_W, 30 + (n // COLUMNS) * PANEL_H
        w, h = PANEL_W - MARGIN - 10, PANEL_H - MARGIN - 20

        def x(m, ox=ox, w=w):
            return ox + MARGIN + (m - lo_m) / (hi_m - lo_m) * w

        def y(p, oy=oy, h=h):
            return oy + 16 + (1 - p) * h

        entry = report["layers"][layer]
        auroc = entry["detection"]["test"]["auroc"]["value"]
        out.append(f'<g class="panel" data-layer="{layer}">')
        out.append(f'<text x="{ox + MARGIN}" y="{oy + 10}">layer {layer} · test AUROC {auroc:.2f}</text>')
        out.append(f'<rect x="{x(lo_m):.1f}" y="{y(1):.1f}" width="{w}" height="{h}" fill="none" stroke="#ccc"/>')
        out.append(f'<line x1="{x(lo_m):.1f}" x2="{x(hi_m):.1f}" y1="{y(0.5):.1f}" y2="{y(0.5):.1f}" '
                   'stroke="#bbb" stroke-dasharray="1 2"/>')
        for p in (0, 0.5, 1):
            out.append(f'<text x="{x(lo_m) - 4:.1f}" y="{y(p) + 3:.1f}" text-anchor="end">{p:g}</text>')
        for m in (lo_m, 0, hi_m):
            out.append(f'<text x="{x(m):.1f}" y="{y(0) + 12:.1f}" text-anchor="middle">{m:g}</text>')
        for series, (color, dash) in STYLES.items():
            points = [(pt["multiplier"], pt["p_match"]) for pt in entry[series]]
            path = " ".join(f"{x(m):.1f},{y(e['value']):.1f}" for m, e in points)
            out.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="1.5"'
                       + (f' stroke-dasharray="{dash}"' if dash else "") + "/>")
            for m, e in points:
                if m == 0:
                    continue
                out.append(f'<g class="point" data-series="{series}" data-multiplier="{m}" data-value="{e["value"]}" '
                           f'data-lo="{e["lo"]}" data-hi="{e["hi"]}">'
                           f'<line x1="{x(m):.1f}" x2="{x(m):.1f}" y1="{y(e["lo"]):.1f}" y2="{y(e["hi"]):.1f}" '
                           f'stroke="{color}"/><circle cx="{x(m):.1f}" cy="{y(e["value"]):.1f}" r="2.2" '
                           f'fill="{color}"/></g>')
        e = entry["curve"][mults.index(0.0)]["p_match"]
        out.append(f'<g class="point" data-series="unsteered" data-multiplier="0" data-value="{e["value"]}" '
                   f'data-lo="{e["lo"]}" data-hi="{e["hi"]}"><line x1="{x(0):.1f}" x2="{x(0):.1f}" '
                   f'y1="{y(e["lo"]):.1f}" y2="{y(e["hi"]):.1f}" stroke="black"/>'
                   f'<circle cx="{x(0):.1f}" cy="{y(e["value"]):.1f}" r="3" fill="black"/></g>')
        out.append("</g>")
    out.append("</svg>")
    return "\n".join(out) + "\n"


def ab_verdict(report: dict) -> list[str]:
    """The result of an A/B report in plain sentences, from its numbers only. A layer *detects* when its test AUROC
    interval lies above the random-direction band's top, *steers* when its effect interval (p(match) at the largest
    minus the smallest multiplier) is above 0 and above its random control's interval, and moves *the wrong way*
    when its effect interval is below 0."""
    layers = report["layers"]
    detects = [l for l, e in layers.items() if e["detection"]["test"]["auroc"]["lo"] > e["chance"]["auroc"]["hi"]]
    steers = [l for l, e in layers.items() if e["effect"]["lo"] > max(0.0, e["control_effect"]["hi"])]
    wrong = [l for l, e in layers.items() if e["effect"]["hi"] < 0]
    moved = [l for l, e in layers.items() if not e["control_effect"]["lo"] <= 0 <= e["control_effect"]["hi"]]
    both = [l for l in detects if l in steers]
    n, names = len(layers), (lambda ls: ", ".join(ls) or "none")
    head = (f"**Result: the direction detects and steers the behaviour at layer(s) {names(both)}.**" if both else
            "**Result: null.** No layer both detects the behaviour above chance and steers it beyond its random "
            "control.")
    out = [head, "", f"- Detection: {len(detects)} of {n} layers have a test AUROC interval above the random band "
                     f"(layers: {names(detects)}).",
           f"- Steering: {len(steers)} of {n} layers have an effect above 0 and above their random control's "
           f"(layers: {names(steers)}); {len(wrong)} {'moves' if len(wrong) == 1 else 'move'} p(match) the wrong way "
           f"(layers: {names(wrong)})."]
    if moved:
        out.append(f"- The random control of the same norm moves p(match) (its interval excludes 0) at layer(s) "
                   f"{names(moved)}: a shift of that size is not specific to the behaviour's direction.")
    sel = str(report["selected"]["layer"])
    e = layers[sel]
    auroc, band, effect = Estimate.from_dict(e["detection"]["test"]["auroc"]), e["chance"]["auroc"], e["effect"]
    where = ("above" if sel in detects else "below" if auroc.hi < band["lo"] else "within")
    sign = ("in the intended direction" if effect["lo"] > 0 else "in the wrong direction" if effect["hi"] < 0
            else "not distinguishable from 0")
    out.append(f"- The layer selected on the select split ({report['selected']['by']}), {sel}, has test AUROC "
               f"{auroc:.3f}, {where} the random band {band['lo']:.3f}-{band['hi']:.3f}, and effect "
               f"{Estimate.from_dict(effect):.3f}, {sign}.")
    return out + [""]


def propensity_markdown(report: dict, command: str | None = None) -> str:
    """Markdown of `report`: provenance lines (`command`, default the report's own `command`, else "python API
    (propensity_markdown)"; the report's command beside it where they differ), the setup, the result
    (`ab_verdict`), one row per layer and the full curves."""
    mults, est = report["multipliers"], Estimate.from_dict
    produced = report.get("command")
    command = command or produced or "python API (propensity_markdown)"
    lines = [*provenance_lines(command),
             *([f"- Numbers from report.json written by: {_code(produced or 'not recorded')}"]
               if command != produced else []),
             f"- Model: `{report.get('model') or 'not recorded'}`; data: `{report['dataset']}` (SHA-256 "
             f"{report.get('data_sha256', 'not recorded')})", "",
             f"A/B propensity: {report['n_questions']} questions (matching letters {report['letter_balance']}), split "
             f"by question {report['splits']} (train balanced to {report['train_letters']} by matching letter), method "
             f"`{report['method']}` read at the answer {report['read']}. p(match) = p(matching letter) / (p(A) + p(B)) "
             f"at the position before the letter, mean over the {report['splits']['test']} test questions, 95% "
             "bootstrap intervals over questions. Multiplier 1 adds the train mean difference along the direction; "
             "the control is a random direction of the same norm; the random band is the "
             f"5-95th percentile of test AUROC over {report['n_random']} random directions.", "",
             *ab_verdict(report),
             f"Unsteered: p(match) {est(report['unsteered']['p_match']):.3f}; probability mass on the two letters "
             f"{est(report['unsteered']['mass']):.3f}.", "",
             f"| layer | test AUROC | random AUROC 5-95% | p(match) at {mults[0]:g} | p(match) at {mults[-1]:g} | "
             f"effect ({mults[-1]:g} vs {mults[0]:g}) | control effect | questions moved up |",
             "|---|---|---|---|---|---|---|---|"]
    for layer, e in report["layers"].items():
        chance = e["chance"]["auroc"]
        lines.append(
            f"| {layer} | {est(e['detection']['test']['auroc']):.3f} | {chance['lo']:.3f}-{chance['hi']:.3f} | "
            f"{est(e['curve'][0]['p_match']):.3f} | {est(e['curve'][-1]['p_match']):.3f} | {est(e['effect']):.3f} | "
            f"{est(e['control_effect']):.3f} | {e['steerable']:.0%} |")
    lines += ["", "Full curves (p(match), vector / control):", "",
              "| layer | " + " | ".join(f"{m:g}" for m in mults) + " |", "|---" * (len(mults) + 1) + "|"]
    for layer, e in report["layers"].items():
        cells = [f"{a['p_match']['value']:.3f} / {b['p_match']['value']:.3f}" for a, b in zip(e["curve"], e["control"])]
        lines.append(f"| {layer} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
