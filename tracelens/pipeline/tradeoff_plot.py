"""`tradeoff_svg`: a steering search's trade-off curves as a standalone SVG (no plotting dependency).

Two panels against KL(unsteered || steered) on the neutral answers (nats/token, square-root axis so the
low-damage end is legible): the judge-free trait effect (nats/token) and the judge's trait score (0-100, on
the search questions). Each searched layer is one curve from the unsteered point (coefficient 0: KL 0, trait
effect 0, the baseline's judge score); the selected layer is drawn dark, the others light, the selected run
ringed. The random controls (the report's `control_curve`) are grey, at the directions' mean KL: in the
trait-effect panel their mean trait effect, with whiskers over the 5-95% band of the directions; in the judge
panel the judge's trait on the search questions (question q under direction q mod n), with its interval over
questions. The KL budget is a dashed vertical line. Every point carries its numbers as `data-*` attributes
(the dashboard's browser test reads them back).
"""

from __future__ import annotations

import math
from html import escape

from tracelens.types import SteeringResults, SteeringRunRecord

PANEL_W, PANEL_H, MARGIN = 330, 230, 44
SELECTED, OTHER, CONTROL = "#1f5fbf", "#9db8e0", "#777777"


def _runs_by_layer(results: SteeringResults, method: str) -> dict[int, list[SteeringRunRecord]]:
    layers: dict[int, list[SteeringRunRecord]] = {}
    for run in results.runs:
        if run.method == method and (run.judge_free or {}).get("kl") is not None:
            layers.setdefault(run.layer, []).append(run)
    return {l: sorted(r, key=lambda r: abs(r.coefficient)) for l, r in sorted(layers.items())}


def tradeoff_svg(results: SteeringResults) -> str | None:
    """The SVG text for `results`' selected layer and every layer searched with its method; None without a
    report line (nothing selected) or without a baseline."""
    report = results.report
    if report is None or results.baseline is None:
        return None
    chosen = report["config"]["vectors"][0]
    by_layer = _runs_by_layer(results, chosen["method"])
    curve = report.get("control_curve") or []
    max_kl = (results.header.selection or {}).get("max_kl")
    kls = [r.judge_free["kl"]["value"] for runs in by_layer.values() for r in runs]
    kls += [p["band"]["kl"]["value"] for p in curve] + ([max_kl] if max_kl else [])
    x_max = max(kls + [1e-3]) * 1.05
    effects = [v for runs in by_layer.values() for r in runs for v in (r.judge_free["trait_effect"]["lo"],
                                                                       r.judge_free["trait_effect"]["hi"])]
    effects += [v for p in curve for v in (p["band"]["trait_effect"]["lo"], p["band"]["trait_effect"]["hi"])] + [0.0]
    width, height = 2 * PANEL_W + 20, PANEL_H + 50
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" class="tradeoff" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="10" '
           f'data-layer="{chosen["layer"]}" data-max-kl="{max_kl}">',
           f'<rect width="{width}" height="{height}" fill="white"/>',
           f'<text x="10" y="16" font-size="12">{escape(results.header.trait)}: trait against damage, '
           f'layer {chosen["layer"]} dark, other layers light, random controls grey; dashed: KL budget</text>']
    baseline_trait = results.baseline.trait_mean
    panels = (("trait_effect", "trait effect (nats/token)", (min(effects), max(effects))),
              ("judge_trait", "judge trait (search questions)", (0.0, 100.0)))
    controls = {"trait_effect": [(p["coefficient"], p["band"]["kl"]["value"], p["band"]["trait_effect"])
                                 for p in curve],
                "judge_trait": [(p["coefficient"], p["band"]["kl"]["value"], p["judged"]["trait"])
                                for p in curve if (p.get("judged") or {}).get("trait")]}
    for n, (key, label, y_range) in enumerate(panels):
        out += _panel(n, key, label, y_range, x_max, by_layer, chosen, controls[key], max_kl, baseline_trait)
    out.append("</svg>")
    return "\n".join(out) + "\n"


def _panel(n, key, label, y_range, x_max, by_layer, chosen, controls, max_kl, baseline_trait) -> list[str]:
    """Panel `n`: `key`'s curves per layer from the unsteered point, the `controls` ((coefficient, KL, estimate)
    per point) and the budget."""
    ox, oy = 10 + n * (PANEL_W + 10), 30
    w, h = PANEL_W - MARGIN - 10, PANEL_H - MARGIN
    y0, y1 = y_range
    y1 = y1 if y1 > y0 else y0 + 1.0

    def x(kl: float) -> float:
        return ox + MARGIN + math.sqrt(max(kl, 0.0) / x_max) * w

    def y(v: float) -> float:
        return oy + (1 - (v - y0) / (y1 - y0)) * h

    out = [f'<g class="panel" data-panel="{key}">',
           f'<rect x="{x(0):.1f}" y="{y(y1):.1f}" width="{w}" height="{h}" fill="none" stroke="#ccc"/>',
           f'<text x="{x(0) + w / 2:.1f}" y="{y(y0) + 26:.1f}" text-anchor="middle">KL (nats/token, sqrt axis)</text>',
           f'<text x="{ox + 10}" y="{y(y1) + h / 2:.1f}" transform="rotate(-90 {ox + 10} {y(y1) + h / 2:.1f})" '
           f'text-anchor="middle">{escape(label)}</text>']
    for tick in (0.0, x_max / 4, x_max):
        out.append(f'<text x="{x(tick):.1f}" y="{y(y0) + 12:.1f}" text-anchor="middle">{tick:.2g}</text>')
    for tick in (y0, y1):
        out.append(f'<text x="{x(0) - 4:.1f}" y="{y(tick) + 3:.1f}" text-anchor="end">{tick:.3g}</text>')
    if max_kl is not None and max_kl <= x_max:
        out.append(f'<line class="budget" data-kl="{max_kl}" x1="{x(max_kl):.1f}" x2="{x(max_kl):.1f}" '
                   f'y1="{y(y0):.1f}" y2="{y(y1):.1f}" stroke="#c33" stroke-dasharray="5 3"/>')
    origin = (0.0, 0.0 if key == "trait_effect" else baseline_trait)
    for layer, runs in by_layer.items():
        color = SELECTED if layer == chosen["layer"] else OTHER
        pts = [origin] + [(r.judge_free["kl"]["value"], _y_value(r, key)["value"]) for r in runs]
        out.append(f'<polyline points="{" ".join(f"{x(a):.1f},{y(b):.1f}" for a, b in pts if b is not None)}" '
                   f'fill="none" stroke="{color}" stroke-width="1.5"/>')
        for r in runs:
            out.append(_point("steered", layer, r.coefficient, r.judge_free["kl"]["value"], _y_value(r, key), color,
                              x, y, selected=layer == chosen["layer"] and r.coefficient == chosen["weight"]))
    if controls:
        pts = [origin] + [(kl, est["value"]) for _, kl, est in controls]
        out.append(f'<polyline points="{" ".join(f"{x(a):.1f},{y(b):.1f}" for a, b in pts)}" fill="none" '
                   f'stroke="{CONTROL}" stroke-dasharray="4 3"/>')
        for coefficient, kl, est in controls:
            out.append(_point("control", chosen["layer"], coefficient, kl, est, CONTROL, x, y))
    out.append(_point("unsteered", chosen["layer"], 0.0, 0.0, {"value": origin[1], "lo": origin[1], "hi": origin[1]},
                      "black", x, y))
    return out + ["</g>"]


def _y_value(run: SteeringRunRecord, key: str) -> dict:
    if key == "trait_effect":
        return run.judge_free["trait_effect"]
    t = run.result.trait_mean
    return {"value": t, "lo": t, "hi": t}


def _point(series, layer, coefficient, kl, est, color, x, y, selected: bool = False) -> str:
    if est["value"] is None:
        return ""
    ring = f'<circle cx="{x(kl):.1f}" cy="{y(est["value"]):.1f}" r="5" fill="none" stroke="black"/>' if selected else ""
    return (f'<g class="point" data-series="{series}" data-layer="{layer}" data-coefficient="{coefficient}" '
            f'data-kl="{kl}" data-value="{est["value"]}" data-lo="{est["lo"]}" data-hi="{est["hi"]}" '
            f'data-selected="{str(selected).lower()}"><line x1="{x(kl):.1f}" x2="{x(kl):.1f}" y1="{y(est["lo"]):.1f}" '
            f'y2="{y(est["hi"]):.1f}" stroke="{color}"/><circle cx="{x(kl):.1f}" cy="{y(est["value"]):.1f}" r="2.6" '
            f'fill="{color}"/>{ring}</g>')
