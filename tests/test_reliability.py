"""kill -9 at stage boundaries and mid-stage: a resumed run ends with exactly the files of a clean run.

Each run is a subprocess (a tiny Llama, extraction then a one-step steering search judged by a
deterministic stand-in judge). It is killed when a stage's file appears or after a fraction of a clean
run's time, then run again to the end; every tensor, JSON file and results line (timestamps aside)
must equal the clean run's, and no results line may be duplicated or unreadable.
"""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

WORKER = textwrap.dedent("""
    import sys
    from tracelens.serving.backends import LocalBackend
    from tracelens.store import Experiment
    from tracelens.pipeline.extraction import ExtractionConfig, run_extraction
    from tracelens.pipeline.steering_eval import SteeringEvalConfig, run_steering_eval
    from tracelens.testing import tiny_model

    class LengthJudge:
        name = "length"
        def score(self, items, trait_name=None, definition=None):
            return [{"trait_score": float(len(i["response"]) % 100), "coherence_score": 90.0} for i in items]

    exp = Experiment.named("killed", sys.argv[1])
    if not exp.config_path.is_file():
        exp.write_config({"base": {"model": "tiny"}}, {"extraction": "base", "application": "base"})
    backend = LocalBackend.from_model(tiny_model("llama").model)
    trait = "starter/optimism"
    run_extraction(exp, [trait], ExtractionConfig(methods=("probe", "mean_diff"), max_new_tokens=4), backend=backend)
    run_steering_eval(exp, trait, LengthJudge(), SteeringEvalConfig(layers=[0, 1], n_coefficients=2, n_search=2,
                      n_report=2, max_new_tokens=3, n_neutral=2), backend=backend)
    print("finished")
""")


def _start(root: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", WORKER, str(root)], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def _finish(root: Path) -> None:
    proc = _start(root)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0 and b"finished" in out


def _outputs(root: Path) -> dict[str, object]:
    """Every output file: bytes, or for results.jsonl its lines without timestamps."""
    found = {}
    for p in sorted((root / "killed").rglob("*")):
        if not p.is_file() or p.name == "config.json":
            continue
        name = str(p.relative_to(root))
        if p.suffix == ".jsonl":
            found[name] = [{k: v for k, v in json.loads(line).items() if k != "timestamp"}
                           for line in p.read_text().splitlines()]
        else:
            found[name] = p.read_bytes()
    return found


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    root = tmp_path_factory.mktemp("clean")
    start = time.monotonic()
    _finish(root)
    return _outputs(root), time.monotonic() - start


STAGE_FILES = {
    "responses written": "killed/extraction/starter/optimism/base/responses/metadata.json",
    "activations written": "killed/extraction/starter/optimism/base/activations/response_all/residual/metadata.json",
    "steering started": "killed/steering/starter/optimism/base/response_all/steering/results.jsonl",
}


@pytest.mark.parametrize("moment", [*STAGE_FILES, 0.5, 0.8])
def test_kill_9_then_resume_gives_the_clean_runs_files(clean, tmp_path, moment):
    files, seconds = clean
    assert STAGE_FILES["activations written"] in files and STAGE_FILES["steering started"] in files
    proc = _start(tmp_path)
    deadline = time.monotonic() + (seconds * moment if isinstance(moment, float) else 600)
    while time.monotonic() < deadline and proc.poll() is None:
        if isinstance(moment, str) and (tmp_path / STAGE_FILES[moment]).is_file():
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    _finish(tmp_path)
    resumed = _outputs(tmp_path)
    stray = [n for n in resumed if ".torn-" in n or ".stale-" in n]
    # A kill between an atomic write's temp file and its rename leaves that hidden `.{name}.*.tmp` behind; it is
    # never read, and the resumed run must have written the real file next to it.
    temps = [n for n in resumed if Path(n).name.startswith(".") and n.endswith(".tmp")]
    for n in temps:
        real = str(Path(n).parent / Path(n).name[1:].rsplit(".", 2)[0])
        assert real in files and resumed.get(real) == files[real], n
    assert set(resumed) - set(stray) - set(temps) == set(files)
    for name, data in files.items():
        assert resumed[name] == data, name
