"""What `import tracelens` costs: seconds and modules loaded in a fresh interpreter, for the bare import and for the
import followed by the first use of a model-side name (`tracelens.LocalBackend`, which loads torch and
TransformerLens), and whether the server, dashboard or vLLM code came in. Prints the ratio of the two.

    python scripts/bench/import_cost.py [--repeats 5]

Run it with another checkout first on PYTHONPATH to measure that checkout (docs/performance.md, "Import cost")."""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

PROBE = """
import json, sys, time
t = time.perf_counter()
import tracelens
{use}
seconds = time.perf_counter() - t
heavy = [m for m in sys.modules if m.split('.')[0] in ('torch', 'transformer_lens', 'vllm')
         or (m.startswith('tracelens.') and m.rpartition('.')[2] in ('server', 'dashboard', 'vllm_backend'))]
print(json.dumps({{"seconds": seconds, "modules": len(sys.modules), "file": tracelens.__file__,
                  "loaded": sorted({{m.split('.')[0] if not m.startswith('tracelens') else m for m in heavy}})}}))
"""


def measure(use: str, repeats: int) -> dict:
    """The median seconds of `repeats` fresh interpreters running `import tracelens` then `use`, with the modules
    and heavy packages the last one loaded."""
    runs = [json.loads(subprocess.run([sys.executable, "-c", PROBE.format(use=use)], capture_output=True, text=True,
                                      check=True).stdout) for _ in range(repeats)]
    return {**runs[-1], "seconds": statistics.median(r["seconds"] for r in runs)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="fresh interpreters per measurement")
    args = parser.parse_args()
    bare = measure("", args.repeats)
    used = measure("tracelens.LocalBackend", args.repeats)
    print(f"tracelens from {bare['file']}")
    for what, r in (("import tracelens", bare), ("... then tracelens.LocalBackend", used)):
        print(f"{what:34s} {r['seconds']:6.2f} s  {r['modules']:5d} modules  heavy: {', '.join(r['loaded']) or 'none'}")
    print(f"bare import / import and first use: {bare['seconds'] / used['seconds']:.4f} of the time, "
          f"{bare['modules'] / used['modules']:.3f} of the modules")


if __name__ == "__main__":
    main()
