"""Re-render an A/B report (report.json written by `tracelens ab`) as Markdown, and redraw its SVG.

    python scripts/ab_table.py runs/ab/report.json --md table.md --svg propensity.svg

`tracelens ab` writes propensity.md itself; this redraws both from a stored report.json (e.g. after a change of
`tracelens.pipeline.ab_plot`). The Markdown opens with this command, the report's own command beside it.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from tracelens.io import write_bytes
from tracelens.pipeline.ab_plot import propensity_markdown, propensity_svg


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report", type=Path)
    parser.add_argument("--md", type=Path, required=True)
    parser.add_argument("--svg", type=Path)
    args = parser.parse_args()
    report = json.loads(args.report.read_text())
    command = shlex.join(["python", "scripts/ab_table.py", *sys.argv[1:]])
    write_bytes(args.md, propensity_markdown(report, command).encode())
    if args.svg:
        write_bytes(args.svg, propensity_svg(report).encode())


if __name__ == "__main__":
    main()
