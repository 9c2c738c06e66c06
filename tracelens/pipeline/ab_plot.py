"""`propensity_svg`: the propensity curves of an A/B report as a standalone SVG (no plotting dependency).

One panel per layer: p(matching letter) against the multiplier for the vector (blue, solid) and the
random control of the same norm (grey, dashed), 95% bootstrap intervals as whiskers, the unsteered
point (black) and 0.5 (dotted). Every point carries its numbers as `data-*` attributes.
"""

from __future__ import annotations

from html import escape

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
