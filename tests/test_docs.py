"""Docs are tests: every fenced `bash` and `python` block of README.md and docs/*.md is run by the suite.

`RUNNERS` maps each doc file that has such blocks to the test file that runs them. This file runs its own in
document order, the README first, in one temporary working folder: each `tracelens ...` line of a bash block
through the installed console script as a subprocess (a user's path), the python blocks of a file in one
namespace. One substitution makes them cheap: `$TRACELENS_DEFAULT_MODEL` names a tiny random 17-layer Llama
saved to a folder, so "default" (`load_model("default")`, `tracelens demo`, the CLI's default model) is that
model; `$TRACELENS_EXPERIMENTS` is a temporary folder holding the experiment configs the repository ships
(`experiments/*/config.json`, as a fresh clone has them). What cannot run here is in `SKIPS`, the one list,
each entry with its reason; `test_the_skip_list` prints it. A block that no runner and no skip covers, a skip
that matches nothing, and a doc command that stops working all fail.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tracelens.pipeline.demo import DEMO_EXPERIMENT
from tracelens.store import Experiment
from tracelens.testing import tiny_model

ROOT = Path(__file__).parents[1]
SCRIPT = Path(sys.executable).with_name("tracelens")
THIS = "tests/test_docs.py"
BLOCK = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.M | re.S)
LANGUAGES = {"bash": "bash", "sh": "bash", "shell": "bash", "console": "bash", "python": "python", "py": "python"}

RUNNERS = {
    "README.md": THIS,
    "docs/monitoring.md": THIS,
    "docs/porting.md": "tests/test_porting.py",  # block by block, in order, on an extracted tiny model
    # the blocks are the example files verbatim (checked there), and it runs each file on the default model
    "docs/ab_interchange_conditional.md": "tests/test_examples_ab.py",
}
"""Every doc file with a bash or python block -> the test file that runs its blocks."""


@dataclass(frozen=True)
class Skip:
    doc: str
    text: str
    """A substring of the skipped bash command or python line (a skipped python line runs as `pass`)."""
    reason: str


SKIPS = [
    Skip("README.md", "make demo", "creates .venv with pip, then runs `tracelens demo` on the real model: "
         "the demo runs here on the tiny model, and CI's `make test` makes the same .venv"),
    Skip("README.md", "make test", "runs this whole suite: it is CI's command (.ci/run)"),
    Skip("README.md", "pip install ", "installs packages: `make setup` (run by CI's `make test`) installs the same"),
    Skip("README.md", "tracelens dashboard", "serves until Ctrl-C: tests/test_cli_console.py starts the same "
         "command on a free port, asks it one request and stops it"),
    Skip("README.md", 'load_model("/path/to/', "placeholder paths: tests/test_loading.py loads saved folders and "
         "merges LoRA adapters"),
    Skip("README.md", 'load_model("Qwen/', "needs that model in the local HF cache, and nothing downloads"),
    Skip("README.md", "load_model(hf_model, tokenizer)", "needs an in-memory model built first: "
         "tests/test_loading.py wraps one"),
    Skip("docs/monitoring.md", "python scripts/dashboard_screenshot.py", "drives Chromium through Playwright "
         "(installed by `make test`, needs root); tests/test_dashboard.py's browser test renders the same page"),
]
"""The one list of doc commands and python lines that are not run, and why."""


@dataclass(frozen=True)
class Step:
    doc: str
    line: int
    language: str
    code: str
    skip: Skip | None = None


def _docs() -> list[str]:
    return ["README.md", *sorted(f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md"))]


def _blocks(doc: str) -> list[tuple[int, str, str]]:
    """(first code line, language, code) of each bash or python block of `doc`."""
    text = (ROOT / doc).read_text()
    return [(text.count("\n", 0, m.start(2)) + 1, LANGUAGES[m[1]], m[2]) for m in BLOCK.finditer(text)
            if m[1] in LANGUAGES]


def _skip(doc: str, text: str) -> Skip | None:
    return next((s for s in SKIPS if s.doc == doc and s.text in text), None)


def _commands(first: int, code: str) -> list[tuple[int, str]]:
    """A bash block's commands with their line numbers: continuation lines joined; blank and comment lines dropped."""
    commands, pending, start = [], "", first
    for n, line in enumerate(code.splitlines(), first):
        if not pending:
            start = n
        pending += line
        if pending.endswith("\\"):
            pending = pending[:-1]
            continue
        if pending.strip() and not pending.lstrip().startswith("#"):
            commands.append((start, pending.strip()))
        pending = ""
    return commands


def _steps(doc: str) -> list[Step]:
    """What running `doc` means: one step per bash command and per python block, a skip step per skipped line."""
    steps = []
    for first, language, code in _blocks(doc):
        if language == "bash":
            steps += [Step(doc, n, "bash", cmd, _skip(doc, cmd)) for n, cmd in _commands(first, code)]
        else:
            lines = code.splitlines()
            skips = [_skip(doc, line) for line in lines]
            steps += [Step(doc, first + i, "python", line, s) for i, (line, s) in enumerate(zip(lines, skips)) if s]
            kept = [re.sub(r"\S.*", "pass", line) if s else line for line, s in zip(lines, skips)]
            steps.append(Step(doc, first, "python", "\n".join(kept) + "\n"))
    return steps


def _uncovered(step: Step) -> bool:
    return step.skip is None and step.language == "bash" and shlex.split(step.code, comments=True)[0] != "tracelens"


def test_every_doc_block_has_a_runner_or_a_skip():
    with_blocks = [doc for doc in _docs() if _blocks(doc)]
    assert sorted(with_blocks) == sorted(RUNNERS), "every doc file with bash/python blocks needs a RUNNERS entry"
    for doc, runner in RUNNERS.items():
        # another runner must exist and name the doc it runs (so this entry cannot outlive it)
        assert runner == THIS or Path(doc).name in (ROOT / runner).read_text(), (doc, runner)
    uncovered = [f"{s.doc}:{s.line}: {s.code}" for doc in RUNNERS if RUNNERS[doc] == THIS for s in _steps(doc)
                 if _uncovered(s)]
    assert not uncovered, "commands that are neither `tracelens ...` nor in SKIPS:\n" + "\n".join(uncovered)


def test_the_skip_list(capsys):
    """Every entry skips something in a doc this file runs (no stale skips); printed with its reasons."""
    used = {s.skip for doc in RUNNERS if RUNNERS[doc] == THIS for s in _steps(doc) if s.skip}
    assert [s for s in SKIPS if s not in used] == [], "SKIPS entries that match no block of a doc run here"
    with capsys.disabled():
        print(f"\ndoc commands and lines not run ({len(SKIPS)} entries of {THIS}::SKIPS):")
        for s in SKIPS:
            print(f"  {s.doc}: {s.text!r}: {s.reason}")


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    """`model/` (a saved tiny 17-layer Llama: layers 10-12 and 15-16 exist, as the docs use them),
    `experiments/` (the shipped configs) and `cwd/`, the working folder every doc runs in."""
    root = tmp_path_factory.mktemp("docs")
    t = tiny_model("llama", n_layers=17, d_model=16, d_mlp=32, n_heads=2, n_kv_heads=1)
    t.reference.save_pretrained(root / "model")
    t.tokenizer.save_pretrained(root / "model")
    for config in (ROOT / "experiments").glob("*/config.json"):
        (root / "experiments" / config.parent.name).mkdir(parents=True)
        shutil.copy(config, root / "experiments" / config.parent.name / "config.json")
    (root / "cwd").mkdir()
    return root


def _environment(home: Path) -> dict[str, str]:
    # One torch thread: the tiny model's ops are too small to split, and on a busy 2-core machine two threads
    # wait on each other (a KV-cache concatenation took 15 ms with two, 0.05 ms with one).
    return {"TRACELENS_DEFAULT_MODEL": str(home / "model"), "TRACELENS_EXPERIMENTS": str(home / "experiments"),
            "OMP_NUM_THREADS": "1"}


def _run_command(home: Path, step: Step) -> None:
    argv = shlex.split(step.code, comments=True)
    assert SCRIPT.is_file(), f"the console script is not installed at {SCRIPT} (pip install -e .)"
    done = subprocess.run([str(SCRIPT), *argv[1:]], cwd=home / "cwd", env={**os.environ, **_environment(home)},
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"{step.doc}:{step.line}: `{step.code}` exited {done.returncode}:\n" \
                                 f"{done.stdout[-1500:]}\n{done.stderr[-3000:]}"
    for flag in ("--output", "--out"):
        if flag in argv:
            assert (home / "cwd" / argv[argv.index(flag) + 1]).exists(), f"{step.doc}:{step.line}: no {flag} written"
    if argv[1] == "demo":
        assert Experiment.named(DEMO_EXPERIMENT, home / "experiments").report_path.is_file(), step.code


@pytest.fixture(scope="module")
def run_doc(home):
    """Runs a doc file's steps once, after every doc before it in RUNNERS (later docs build on the README's)."""
    passed: dict[str, bool] = {}
    ours = [doc for doc, runner in RUNNERS.items() if runner == THIS]

    def run(doc: str, monkeypatch) -> None:
        for earlier in ours[: ours.index(doc) + 1]:
            if earlier in passed:
                assert passed[earlier], f"{doc} builds on {earlier}, whose blocks failed"
                continue
            passed[earlier] = False
            with monkeypatch.context() as m:
                for name, value in _environment(home).items():
                    m.setenv(name, value)
                m.chdir(home / "cwd")
                namespace: dict = {"__name__": "__main__"}
                for step in _steps(earlier):
                    assert not _uncovered(step), f"{step.doc}:{step.line}: no runner or skip for `{step.code}`"
                    if step.skip:
                        continue
                    if step.language == "bash":
                        _run_command(home, step)
                    else:
                        exec(compile(step.code, f"{step.doc}:{step.line}", "exec"), namespace)
            passed[earlier] = True

    return run


@pytest.mark.slow  # the README's main job, the demo and monitoring on the tiny model: about 2 minutes
@pytest.mark.parametrize("doc", [doc for doc, runner in RUNNERS.items() if runner == THIS])
def test_the_doc_blocks_run(doc, run_doc, monkeypatch):
    run_doc(doc, monkeypatch)
