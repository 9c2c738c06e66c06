"""The Markdown report: numbers parsed back out equal the stored artifacts, caveats follow the numbers."""

import json
import re
import shutil
import subprocess
from importlib.metadata import version
from pathlib import Path

import pytest
from conftest import cached_tiny
from test_steering_eval import TRAIT, FixedJudge

from tracelens.serving.backends import LocalBackend
from tracelens.store import Experiment
from tracelens.pipeline.extraction import ExtractionConfig, run_extraction
from tracelens.io import read_json, read_jsonl, write_json
from tracelens.pipeline.report import ROW_NAMES, fmt_ci, render_report, tradeoff_figure_name, write_report
from tracelens.provenance import git_commit
from tracelens.pipeline.steering_eval import CONDITIONS, SteeringEvalConfig, run_steering_eval

CONFIG = SteeringEvalConfig(layers=[0, 1], n_coefficients=2, n_search=2, n_report=2, max_new_tokens=3, n_neutral=2,
                            max_kl=100.0)
NUM = r"(-?\d+\.\d+)"
CI = re.compile(rf"{NUM} \[{NUM}, {NUM}\]")
COMMAND = "tracelens report --experiment report-exp --output 'my results.md'"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Extraction + steering evaluation on the tiny llama, as tests/test_steering_eval.py runs them."""
    exp = Experiment.named("report-exp", tmp_path_factory.mktemp("experiments"))
    exp.write_config({"base": {"model": "tiny"}}, {"extraction": "base", "application": "base"})
    backend = LocalBackend.from_model(cached_tiny("llama").model)
    run_extraction(exp, [TRAIT], ExtractionConfig(methods=("probe",), max_new_tokens=3), backend=backend)
    run_steering_eval(exp, TRAIT, FixedJudge(), CONFIG, backend=backend)
    return exp


def _copy(exp: Experiment, tmp_path, ignore=None) -> Experiment:
    shutil.copytree(exp.dir, tmp_path / exp.name, ignore=ignore)
    return Experiment.named(exp.name, tmp_path)


def _evaluation_path(exp):
    [path] = exp.evaluation_paths(TRAIT, "base")
    return path


def _results_path(exp):
    return exp.steering_results_path(TRAIT, "base", "response[:]")


def _rows(md: str, heading: str) -> list[list[str]]:
    """The body cells of the first table after the line starting with ``heading``."""
    lines = md.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(heading))
    table = []
    for line in lines[start + 1:]:
        if line.startswith("|"):
            table.append([c.strip() for c in line.strip("|").split("|")])
        elif table:
            break
    assert table[1][0].startswith("---"), table[:2]
    return table[2:]


def _selected_row(ev: dict) -> dict:
    return next(r for r in ev["results"] if (r["method"], r["layer"]) == (ev["selected"]["method"], ev["selected"]["layer"]))


def _ci(cell: str) -> dict:
    value, lo, hi = map(float, CI.fullmatch(cell).groups())
    return {"value": value, "lo": lo, "hi": hi}


def _band(cell: str) -> tuple[float, float]:
    lo, hi = map(float, re.fullmatch(rf"\[{NUM}, {NUM}\]", cell).groups())
    return lo, hi


def test_extraction_tables_carry_the_stored_numbers_and_chance_band(built):
    md = render_report(built)
    ev = read_json(_evaluation_path(built))
    for method in ("probe", "random_baseline"):
        rows = _rows(md, f"**`{method}`**")
        stored = sorted((r for r in ev["results"] if r["method"] == method), key=lambda r: r["layer"])
        assert [int(r[0]) for r in rows] == [r["layer"] for r in stored] == [0, 1]
        for cells, r in zip(rows, stored):
            band = ev["chance"]["layers"][str(r["layer"])]
            assert _ci(cells[1]) == r["test"]["auroc"] and _ci(cells[2]) == r["test"]["accuracy"]
            assert _band(cells[3]) == pytest.approx((band["auroc"]["lo"], band["auroc"]["hi"]), abs=5e-5)
            assert _band(cells[4]) == pytest.approx((band["accuracy"]["lo"], band["accuracy"]["hi"]), abs=5e-5)
            assert float(cells[5]) == pytest.approx(r["select"]["auroc"], abs=5e-5)
            assert cells[6] == ("yes" if r["above_chance"] else "no")
            is_selected = (method, r["layer"]) == (ev["selected"]["method"], ev["selected"]["layer"])
            assert cells[7] == ("selected" if is_selected else "")
    sel = ev["selected"]
    assert (f"**Selected:** `{sel['method']}` at layer {sel['layer']}, chosen by {sel['by']} on the select split "
            f"({ev['splits']['select']} pairs) among 2 layers x 1 method (2 candidates)") in md
    pairs = ev["splits"]
    assert f"train {pairs['train']} pairs / {pairs['train']} questions" in md  # one pair per question here
    assert "- Model: `tiny`" in md and "- Produced by: `python API (run_extraction)`" in md
    assert ev["chance"]["n_directions"] == 100  # the default
    assert ("100 random directions per layer, 5-95th percentile, against which 2 fitted method x layer rows are "
            "tested (about 0.1 would clear a per-layer 95th percentile by chance alone)") in md
    above = sum(r["above_chance"] for r in ev["results"] if r["method"] != "random_baseline")
    assert (f"{above} of 2 fitted method x layer rows are above chance; by chance alone about 2 x 0.05 = 0.1 would "
            "clear a per-layer 95th percentile (the band is not corrected for the 2 comparisons).") in md


def test_extraction_names_its_command_and_warns_below_30_test_pairs(built, tmp_path):
    exp = _copy(built, tmp_path, ignore=shutil.ignore_patterns("steering"))
    ev = read_json(_evaluation_path(exp))
    ev["command"] = "tracelens extract --experiment report-exp --traits x"
    ev["splits"]["test"] = 29
    write_json(_evaluation_path(exp), ev)
    md = render_report(exp)
    assert "- Produced by: `tracelens extract --experiment report-exp --traits x`" in md
    assert "The test split has 29 pairs (fewer than 30): percentile-bootstrap intervals" in md
    del ev["command"]  # a file from before the command was recorded
    ev["splits"]["test"] = 30
    write_json(_evaluation_path(exp), ev)
    md = render_report(exp)
    assert "- Produced by: not recorded" in md and "The test split has" not in md
    ev["splits"]["test"] = 10  # the demo's test split
    write_json(_evaluation_path(exp), ev)
    assert "The test split has 10 pairs (fewer than 30)" in render_report(exp)


def test_steering_runs_report_line_and_control_carry_the_stored_numbers(built):
    md = render_report(built)
    lines = read_jsonl(_results_path(built))
    runs = [l for l in lines if l["type"] == "run"]
    [report] = [l for l in lines if l["type"] == "report"]
    rows = _rows(md, "**Search runs**")
    assert len(rows) == len(runs) == 4
    by_key = {(r["config"]["vectors"][0]["layer"], r["config"]["vectors"][0]["weight"]): r for r in runs}
    for cells in rows:
        run = by_key[(int(cells[0]), float(cells[1]))]
        assert float(cells[2]) == pytest.approx(run["result"]["trait_mean"], abs=0.05)
        assert [_ci(c) for c in cells[4:7]] == [run["judge_free"][k] for k in ("trait_effect", "nll_cost", "kl")]
        assert cells[7] == ("yes" if run["judge_free"]["kl"]["value"] <= 100.0 else "**over**")
        assert cells[8] == ("selected" if run["config"] == report["config"] else "")
    assert sum(c[8] == "selected" for c in rows) == 1
    table = {r[0]: r for r in _rows(md, "**Report**")}
    assert list(table) == [ROW_NAMES[c] for c in CONDITIONS]
    for cond in CONDITIONS[1:]:
        row = table[ROW_NAMES[cond]]
        assert _ci(row[2]) == pytest.approx(report["trait_delta"][cond], abs=0.05)
        assert _ci(row[1]) == pytest.approx(report["trait"][cond], abs=0.05)
        assert _ci(row[7]) == pytest.approx(report["steerability"]["moved"][cond], abs=0.005)
        stored = report["judge_free"].get(cond)
        if stored:
            assert [_ci(c) for c in row[4:6]] == [stored[k] for k in ("trait_effect", "nll_cost")]
    assert [_ci(c) for c in table["steered"][4:7]] == [report["judge_free"]["steered"][k]
                                                        for k in ("trait_effect", "nll_cost", "kl")]
    assert table[ROW_NAMES["prompted"]][6] == "not defined"  # KL needs the unsteered context
    validity = next(l for l in lines if l["type"] == "header")["eval"]["validity"]  # measured by the stage
    measured = f"AUROC {fmt_ci(validity['auroc'])} on {validity['n_pairs']} pairs ({validity['data']})"
    assert f"re-judged by `fixed` (validity: {measured}) on {report['n_questions']} report questions" in md
    assert f"- Judge: `fixed` (judge); validity: {measured}" in md
    for ex in report["examples"]:
        assert f"- Q: {ex['question']}" in md


def test_report_is_byte_identical_and_written_atomically(built, tmp_path, monkeypatch):
    first = render_report(built)
    monkeypatch.setenv("TRACELENS_EXPERIMENTS", str(built.root))
    assert render_report(built.name) == first
    path = write_report(built, [TRAIT], tmp_path / "out" / "report.md", command="python API (render_report)")
    figure = path.parent / tradeoff_figure_name(TRAIT, "response_all")
    assert path.read_bytes() == first.encode() and sorted(path.parent.iterdir()) == sorted([path, figure])
    assert f"]({figure.name})" in first and figure.read_text().startswith("<svg")
    assert render_report(built, [TRAIT], variant="base") == first


def test_report_follows_edited_artifacts_and_derives_its_caveats(built, tmp_path):
    exp = _copy(built, tmp_path)
    ev = read_json(_evaluation_path(exp))
    sel = _selected_row(ev)
    sel["test"]["auroc"] = {"value": 0.6123, "lo": 0.4567, "hi": 0.7012}
    sel["above_chance"] = False
    control = next(r for r in ev["results"] if r["method"] == "random_baseline" and r["layer"] == 1)
    control["above_chance"] = True
    write_json(_evaluation_path(exp), ev)
    lines = read_jsonl(_results_path(exp))
    lines[0]["eval"]["validity"] = {"auroc": {"value": 0.61, "lo": 0.45, "hi": 0.77}, "n_pairs": 11,
                                    "data": "test split"}
    report = next(l for l in lines if l["type"] == "report")
    report["trait_delta"] = {"steered": {"value": 1.5, "lo": -0.5, "hi": 3.0},
                             "control": {"value": 2.0, "lo": 1.0, "hi": 4.0}}
    report["examples"][0]["steered"] = "**bold** | <b>x</b> [link](http://a) " + "y" * 300
    _results_path(exp).write_text("".join(json.dumps(l) + "\n" for l in lines))
    md = render_report(exp)
    assert "0.6123 [0.4567, 0.7012]" in md
    assert "does not clear the chance band's top" in md
    assert "steered trait delta on report questions (1.5 [-0.5, 3.0]) includes 0" in md
    assert "overlaps the random control's (2.0 [1.0, 4.0])" in md
    assert "`random_baseline` is above chance at 1 layer(s) (1)" in md
    assert "validity: AUROC 0.6100 [0.4500, 0.7700] on 11 pairs (test split)" in md
    assert "The judge's validity AUROC interval (0.6100 [0.4500, 0.7700]) reaches 0.5" in md
    [steered] = [l for l in md.splitlines() if l.startswith("  - steered: \\*\\*bold")]
    assert steered.startswith("  - steered: \\*\\*bold\\*\\* \\| \\<b\\>x\\</b\\> \\[link\\](http://a) y")
    assert steered.endswith("y…") and steered.count("y") == 200 - len("**bold** | <b>x</b> [link](http://a) ")
    # on the original artifacts each caveat appears exactly when their numbers call for it
    original, ev = render_report(built), read_json(_evaluation_path(built))
    report = next(l for l in read_jsonl(_results_path(built)) if l["type"] == "report")
    steered, control = report["trait_delta"]["steered"], report["trait_delta"]["control"]
    sel = _selected_row(ev)
    expected = {
        "does not clear the chance band": not sel["above_chance"],
        "includes 0: the judge": steered["lo"] <= 0 <= steered["hi"],
        "overlaps the random control's (": steered["lo"] <= control["hi"] and control["lo"] <= steered["hi"],
        "`random_baseline` is above chance": any(r["above_chance"] for r in ev["results"]
                                                 if r["method"] == "random_baseline"),
        "The judge's validity was not measured": False,  # the steering stage measures it
    }
    assert {c: c in original for c in expected} == expected


def test_extraction_only_experiment(built, tmp_path):
    exp = _copy(built, tmp_path, ignore=shutil.ignore_patterns("steering"))
    md = render_report(exp)
    assert "### Extraction: position `response[:]`" in md and "### Steering" not in md
    assert "**Selected:**" in md


def test_experiment_with_nothing_is_a_clear_error(tmp_path):
    exp = Experiment.named("empty", tmp_path)
    with pytest.raises(FileNotFoundError, match="has no config"):
        render_report(exp)
    exp.write_config({"base": {"model": "tiny"}})
    with pytest.raises(FileNotFoundError, match="no extraction evaluation .* and no steering results"):
        render_report(exp)
    with pytest.raises(FileNotFoundError, match="no extraction evaluation or steering results for 'starter/optimism'"):
        render_report(exp, [TRAIT])


def _git(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=False)


def test_report_opens_with_the_command_version_and_commit(built, tmp_path):
    md = render_report(built, command=COMMAND)
    head = _git("rev-parse", "HEAD", cwd=REPO)
    if head.returncode == 0:  # a git checkout (as in development and CI): its HEAD, marked when dirty
        dirty = _git("status", "--porcelain", cwd=REPO).stdout.strip() != ""
        commit = head.stdout.strip() + (" (dirty)" if dirty else "")
        assert re.fullmatch(r"[0-9a-f]{40}( \(dirty\))?", commit)
    else:
        commit = "unknown"
    assert md.splitlines()[:5] == [f"- Command: `{COMMAND}`", f"- tracelens version: {version('tracelens')}",
                                   f"- Git commit: {commit}", "", "# Experiment report: report-exp"]
    path = write_report(built, None, tmp_path / "r.md", command=COMMAND)
    assert path.read_text() == md
    # without a command: what called it, never a Python process's unrelated argv
    assert render_report(built).splitlines()[0] == "- Command: `python API (render_report)`"
    assert write_report(built, None, path).read_text().splitlines()[0] == "- Command: `python API (write_report)`"


def test_tracelens_report_names_its_own_command_line(built, tmp_path, monkeypatch):
    from tracelens.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TRACELENS_EXPERIMENTS", str(built.dir.parent))
    assert main(["report", "--experiment", "report-exp", "--output", "my results.md"]) == 0
    assert (tmp_path / "my results.md").read_text().splitlines()[0] == f"- Command: `{COMMAND}`"
    assert render_report(built, command="`odd` name").splitlines()[0] == "- Command: `` `odd` name ``"


def test_commit_is_unknown_outside_a_checkout_and_dirty_when_the_tree_is(tmp_path, monkeypatch):
    assert git_commit(tmp_path) == "unknown"  # not a checkout
    repo, source = tmp_path / "repo", tmp_path / "repo" / "pkg"
    source.mkdir(parents=True)
    (source / "a.py").write_text("x = 1\n")
    assert _git("init", "-q", cwd=repo).returncode == 0
    assert git_commit(source) == "unknown"  # a checkout that does not track the source folder
    _git("add", "pkg/a.py", cwd=repo)
    assert _git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "a", cwd=repo).returncode == 0
    sha = _git("rev-parse", "HEAD", cwd=repo).stdout.strip()
    assert git_commit(source) == sha
    (repo / "notes.txt").write_text("uncommitted\n")
    assert git_commit(source) == f"{sha} (dirty)"
    monkeypatch.setenv("PATH", str(tmp_path / "no-git-here"))
    assert git_commit(source) == "unknown"  # git missing


def test_the_verdicts_follow_the_stored_numbers(built, tmp_path):
    exp = _copy(built, tmp_path)
    lines = read_jsonl(_results_path(exp))
    report = next(l for l in lines if l["type"] == "report")
    for versus, verdict in (({"value": 12.0, "lo": 4.0, "hi": 20.0}, "Steering beats prompting"),
                            ({"value": -12.0, "lo": -20.0, "hi": -4.0}, "Prompting beats steering"),
                            ({"value": 1.0, "lo": -3.0, "hi": 5.0}, "Steering and prompting cannot be told apart")):
        report["steering_vs_prompting"] = versus
        report["steerability"]["anti_steerable"] = [report["per_question"]["questions"][0]]
        _results_path(exp).write_text("".join(json.dumps(l) + "\n" for l in lines))
        md = render_report(exp)
        assert f"- {verdict} on this model: steered minus prompted judge trait, in the trait's direction, " \
               f"{fmt_ci(versus, '.1f')} points per question" in md
        assert f"Anti-steerable (moved the wrong way beyond the control's 5-95% spread of deltas" in md
        assert report["per_question"]["questions"][0] in md
    assert "The KL budget (100 nats/token) cost nothing" in md
    assert "The report rests on 2 questions" in md  # the small-sample caveat fires below 30 questions