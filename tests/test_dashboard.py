"""The Trait Dynamics dashboard: massive-dim cleaning, the JSON API, its token, and one real headless-Chromium check."""

import base64
import http.client
import json
import os
import shutil
from pathlib import Path

import pytest

from tracelens.model.cleaning import clean_scores, dims_for_mode
from tracelens.app.dashboard import make_server, serve_in_thread
from tracelens.store import Experiment
from tracelens.io import write_json
from tracelens.types import (
    JudgeResult,
    ProjectionConfig,
    ProjectionEntry,
    ProjectionRecord,
    ResponseRecord,
    SteeringHeader,
    SteeringResults,
    SteeringRunRecord,
)

VARIANT, PROMPT_SET, JOY, CALM = "instruct", "general", "emotion/joy", "tonal/calm"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]

# Hand-computed oracle. Layer 2, prompt raw [1, 2, 3], response raw [4, 5].
# dim 7: vector 0.5, acts prompt [2, 4, 6] -> removes [1, 2, 3]; response [0, 2] -> removes [0, 1]
# dim 9: vector 0.25, acts prompt [2, 2, 2] -> removes [.5, .5, .5]; response [4, 8] -> removes [1, 2]
MASSIVE = {
    "dims": {"2": [7, 9]},
    "top5_3layers": [7],
    "all_candidates": [7, 9],
    "prompt": {"2": {"7": [2.0, 4.0, 6.0], "9": [2.0, 2.0, 2.0]}},
    "response": {"2": {"7": [0.0, 2.0], "9": [4.0, 8.0]}},
    "vector": {"2": {"7": 0.5, "9": 0.25}},
}
EXPECTED = {
    "none": ([1.0, 2.0, 3.0], [4.0, 5.0]),
    "top5-3layers": ([0.0, 0.0, 0.0], [4.0, 4.0]),
    "all": ([-0.5, -0.5, -0.5], [3.0, 2.0]),
}


# --- cleaning formula ---------------------------------------------------------------------------------


def test_clean_scores_hand_computed():
    acts, vec = MASSIVE["prompt"]["2"], MASSIVE["vector"]["2"]
    assert clean_scores([1, 2, 3], acts, vec, [7]) == [0.0, 0.0, 0.0]
    assert clean_scores([1, 2, 3], acts, vec, [7, 9]) == [-0.5, -0.5, -0.5]
    assert clean_scores([4, 5], MASSIVE["response"]["2"], vec, ["9"]) == [3.0, 3.0]  # string dims work too
    assert clean_scores([4, 5], {9: [4, 8]}, {9: 0.25}, ["9"]) == [3.0, 3.0]  # and int keys


def test_clean_scores_without_dims_is_a_copy():
    raw = [1.5, -2.0]
    out = clean_scores(raw, {}, {}, [])
    assert out == raw and out is not raw


def test_clean_scores_rejects_missing_dims_and_wrong_lengths():
    with pytest.raises(ValueError, match="massive dim 8 has no activations"):
        clean_scores([1.0], {"7": [1.0]}, {"7": 1.0}, [8])
    with pytest.raises(ValueError, match="massive dim 7 has no activations or no vector value"):
        clean_scores([1.0], {"7": [1.0]}, {}, [7])
    with pytest.raises(ValueError, match="has 2 activations for 1 tokens"):
        clean_scores([1.0], {"7": [1.0, 2.0]}, {"7": 1.0}, [7])


def test_dims_for_mode():
    assert dims_for_mode(MASSIVE, "none") == [] and dims_for_mode(None, "none") == []
    assert dims_for_mode(MASSIVE, "top5-3layers") == [7]
    assert dims_for_mode(MASSIVE, "all") == [7, 9]
    with pytest.raises(ValueError, match="clean mode must be one of"):
        dims_for_mode(MASSIVE, "some")
    with pytest.raises(ValueError, match="no massive_dim_data"):
        dims_for_mode({}, "all")


# --- fixtures -----------------------------------------------------------------------------------------


def _est(value: float, lo: float, hi: float) -> dict:
    return {"value": value, "lo": lo, "hi": hi}


# (method, layer, test AUROC, its interval, above chance): the chance band is [0.3, 0.7] at layer 1, [0.35, 0.75] at 2
AUROCS = [("probe", 1, 0.8, 0.72, 0.88, True), ("probe", 2, 0.9, 0.8, 0.95, True),
          ("mean_diff", 1, 0.7, 0.55, 0.8, False), ("mean_diff", 2, 0.6, 0.5, 0.7, False)]
EVALUATION = {
    "trait": JOY, "position": "response[:5]", "component": "residual",
    "splits": {"train": 30, "select": 10, "test": 10},
    "bootstrap": {"n_resamples": 1000, "level": 0.95, "unit": "test question", "seed": 0},
    "chance": {"n_directions": 20, "percentiles": [5.0, 95.0], "layers": {
        "1": {"auroc": {"lo": 0.3, "median": 0.5, "hi": 0.7}, "accuracy": {"lo": 0.4, "median": 0.5, "hi": 0.6}},
        "2": {"auroc": {"lo": 0.35, "median": 0.5, "hi": 0.75}, "accuracy": {"lo": 0.42, "median": 0.5, "hi": 0.58}}}},
    "results": [{"method": m, "layer": l, "threshold": 0.1,
                 "select": {"auroc": v - 0.05, "accuracy": v - 0.1, "effect_size": 1.0},
                 "test": {"auroc": _est(v, lo, hi), "accuracy": _est(v - 0.1, lo - 0.1, hi - 0.1),
                          "effect_size": _est(1.2, 0.8, 1.6)}, "above_chance": above}
                for m, l, v, lo, hi, above in AUROCS],
    "selected": {"method": "probe", "layer": 2, "by": "select auroc"},
    "input_hash": "0123456789abcdef",
}
HEADER = SteeringHeader(JOY, eval={"model": "fixed", "method": "judge",
                                   "validity": {"auroc": _est(0.85, 0.7, 0.95), "n_pairs": 10, "data": "test split"}},
                        selection={"max_kl": 0.08, "min_coherence": 77.0, "n_controls": 10, "control_seed": 1,
                                   "grid": {"low": 0.02, "high": 1.0, "n": 2}})
# (layer, coefficient, judge trait, judge coherence, trait effect, NLL cost); KL is NLL cost / 2
STEERING = [(2, 4.0, 60.0, 85.0, 0.3, 0.2), (2, 2.0, 40.0, 90.0, 0.15, 0.08), (3, 2.0, 30.0, 88.0, 0.1, 0.05)]
RUNS = [SteeringRunRecord(JudgeResult(trait_mean=t, coherence_mean=c, n=5),
                          ProjectionConfig.single(layer, "residual", "response[:5]", "probe", coef),
                          judge_free={"trait_effect": _est(te, te - 0.05, te + 0.05),
                                      "nll_cost": _est(nll, nll - 0.02, nll + 0.02), "kl": _est(nll / 2, nll / 3, nll)})
        for layer, coef, t, c, te, nll in STEERING]
CONTROL_CURVE = [{"coefficient": k, "per_direction": {}, "band": {
    "trait_effect": _est(te, te - 0.03, te + 0.03), "nll_cost": _est(0.1, 0.05, 0.15), "kl": _est(kl, kl, kl)},
    "judged": {"trait": _est(jt, jt - 6.0, jt + 6.0), "coherence": _est(80.0, 75.0, 85.0)}}
    for k, te, kl, jt in ((2.0, 0.01, 0.03, 24.0), (4.0, -0.02, 0.09, 18.0))]
REPORT = {"type": "report", "config": RUNS[1].config.to_dict(), "n_questions": 4,
          "results": {k: JudgeResult(trait_mean=v, coherence_mean=88.0, n=4).to_dict()
                      for k, v in (("unsteered", 20.0), ("prompted", 50.0), ("steered", 55.0), ("control", 22.0))},
          "trait": {"unsteered": _est(20.0, 15.0, 25.0), "prompted": _est(50.0, 40.0, 60.0),
                    "steered": _est(55.0, 45.0, 65.0), "control": _est(22.0, 17.0, 27.0)},
          "coherence": {k: _est(88.0, 85.0, 91.0) for k in ("unsteered", "prompted", "steered", "control")},
          "trait_delta": {"prompted": _est(30.0, 20.0, 40.0), "steered": _est(35.0, 25.0, 45.0),
                          "control": _est(2.0, -3.0, 7.0)},
          "coherence_delta": {k: _est(0.0, -2.0, 2.0) for k in ("prompted", "steered", "control")},
          "judge_free": {"steered": RUNS[1].judge_free, "control": CONTROL_CURVE[0]["band"]},
          "control_curve": CONTROL_CURVE,
          "examples": [{"question": "How?", "unsteered": "Fine.", "steered": "Great!", "control": "Fine?"}]}


def _write_experiment(root: Path) -> Experiment:
    exp = Experiment.named("exp", root)
    exp.write_config({VARIANT: {"model": "default", "lora": None}}, defaults={"application": VARIANT})
    tokens = ["<s>", "How", "?", "Great", "!"]
    response = ResponseRecord(prompt="How?", response="Great!", tokens=tokens, token_ids=[0, 1, 2, 3, 4], prompt_end=3)
    write_json(exp.inference_response_path(VARIANT, PROMPT_SET, 0), response.to_dict())
    for trait, scale in ((JOY, 1.0), (CALM, -1.0)):
        entry = ProjectionEntry.build("probe", 2, "evaluation", 0.0, [scale * x for x in (1, 2, 3)],
                                      [scale * x for x in (4, 5)], [1.0] * 3, [1.0] * 2)
        record = ProjectionRecord(0, PROMPT_SET, 3, 2, [entry], position="response[:5]").to_dict()
        record["massive_dim_data"] = MASSIVE
        write_json(exp.projection_path(VARIANT, trait, PROMPT_SET, 0), record)
    # a second prompt whose projections were never written
    write_json(exp.inference_response_path(VARIANT, PROMPT_SET, 1), response.to_dict())
    write_json(exp.evaluation_path(JOY, VARIANT, "response[:5]", "residual"), EVALUATION)
    SteeringResults(HEADER, JudgeResult(trait_mean=20.0, coherence_mean=92.0, n=5), RUNS,
                    baseline_judge_free={"llr": _est(0.1, 0.05, 0.15), "nll": _est(2.0, 1.9, 2.1)},
                    report=REPORT).save(exp.steering_results_path(JOY, VARIANT, "response[:5]"))
    return exp


@pytest.fixture
def server(tmp_path):
    exp = _write_experiment(tmp_path / "experiments")
    srv, thread = serve_in_thread(exp, verbose=False)
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join(5)


def _get(server, path: str, host: str | None = None, headers: dict | None = None, response: bool = False):
    port = server.server_address[1]
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", path, headers={"Host": host or f"127.0.0.1:{port}", **(headers or {})})
    res = conn.getresponse()
    body = res.read()
    conn.close()
    return (res.status, res.getheader("Content-Type"), body) + ((res,) if response else ())


def _json(server, path: str, status: int = 200):
    got, ctype, body = _get(server, path)
    assert ctype == "application/json", (path, ctype, body[:200])
    data = json.loads(body)
    assert got == status, (path, got, data)
    return data


# --- API ----------------------------------------------------------------------------------------------


def test_listings(server):
    assert _json(server, "/api/info") == {"experiment": "exp", "variants": [VARIANT], "default_variant": VARIANT}
    assert _json(server, f"/api/prompt-sets?variant={VARIANT}") == {"prompt_sets": [PROMPT_SET]}
    prompts = _json(server, f"/api/prompts?variant={VARIANT}&prompt_set={PROMPT_SET}")["prompts"]
    assert prompts == [{"id": "0", "prompt": "How?"}, {"id": "1", "prompt": "How?"}]
    assert _json(server, f"/api/traits?variant={VARIANT}")["traits"] == [JOY, CALM]
    assert _json(server, f"/api/traits?variant={VARIANT}&kind=extraction")["traits"] == [JOY]
    assert _json(server, f"/api/traits?variant={VARIANT}&kind=steering")["traits"] == [JOY]


@pytest.mark.parametrize("mode", list(EXPECTED))
def test_projections_clean_modes_match_the_hand_computed_formula(server, mode):
    data = _json(server, f"/api/projections?variant={VARIANT}&prompt_set={PROMPT_SET}&prompt_id=0"
                         f"&trait={JOY}&trait={CALM}&clean={mode}")
    assert data["tokens"] == ["<s>", "How", "?", "Great", "!"] and data["prompt_end"] == 3 and data["errors"] == {}
    [joy] = data["traits"][JOY]
    assert (joy["prompt"], joy["response"]) == EXPECTED[mode]
    assert joy["dims_removed"] == dims_for_mode(MASSIVE, mode)
    # calm's raw scores are negated; the same massive terms are subtracted
    [calm] = data["traits"][CALM]
    removed = [r - c for r, c in zip([1.0, 2.0, 3.0, 4.0, 5.0], EXPECTED[mode][0] + EXPECTED[mode][1])]
    assert calm["prompt"] + calm["response"] == [-x - d for x, d in zip([1, 2, 3, 4, 5], removed)]


def test_missing_files_give_json_errors(server):
    base = f"/api/projections?variant={VARIANT}&prompt_set={PROMPT_SET}"
    data = _json(server, f"{base}&prompt_id=1&trait={JOY}", 404)
    assert "no projections at" in data["error"] and "run the pipeline stage" in data["error"]
    data = _json(server, f"{base}&prompt_id=7&trait={JOY}", 404)
    assert "no response at" in data["error"]
    data = _json(server, f"{base}&prompt_id=0&trait={JOY}&trait=emotion/fear")  # one of two traits missing
    assert list(data["traits"]) == [JOY] and "no projections at" in data["errors"]["emotion/fear"]
    assert "no extraction evaluation" in _json(server, f"/api/extraction?variant={VARIANT}&trait={CALM}", 404)["error"]
    assert "no steering results" in _json(server, f"/api/steering?variant={VARIANT}&trait={CALM}", 404)["error"]
    assert "no responses for prompt set" in _json(server, f"/api/prompts?variant=base&prompt_set=x", 404)["error"]
    assert "no API route" in _json(server, "/api/nothing", 404)["error"]
    assert "missing query parameter 'trait'" in _json(server, f"/api/extraction?variant={VARIANT}", 400)["error"]
    assert "clean must be one of" in _json(server, f"{base}&prompt_id=0&trait={JOY}&clean=x", 400)["error"]


@pytest.mark.parametrize("query", [
    f"/api/projections?variant={VARIANT}&prompt_set={PROMPT_SET}&prompt_id=0&trait=../../etc/passwd",
    f"/api/projections?variant={VARIANT}&prompt_set={PROMPT_SET}&prompt_id=0&trait=%2e%2e/%2e%2e",
    f"/api/projections?variant={VARIANT}&prompt_set={PROMPT_SET}&prompt_id=0&trait=/etc/passwd",
    f"/api/projections?variant={VARIANT}&prompt_set=../../../etc&prompt_id=passwd&trait={JOY}",
    f"/api/projections?variant={VARIANT}&prompt_set={PROMPT_SET}&prompt_id=..%2F..%2Fconfig&trait={JOY}",
    "/api/prompts?variant=..&prompt_set=general",
    "/api/prompts?variant=instruct&prompt_set=%2Fetc",
    "/api/extraction?variant=instruct&trait=emotion%2F..%2F..%2F..",
    "/api/steering?variant=%2e%2e&trait=emotion/joy",
    "/api/traits?variant=instruct&kind=../config",
])
def test_path_traversal_is_refused(server, query):
    data = _json(server, query, 400)
    assert "invalid" in data["error"] or "kind must be" in data["error"]
    assert "root:" not in json.dumps(data)


@pytest.mark.parametrize("path", ["/../../etc/passwd", "/%2e%2e/%2e%2e/etc/passwd", "/etc/passwd", "/config.json",
                                  "/api/../config.json", "//etc/passwd"])
def test_only_the_page_and_the_api_are_served(server, path):
    status, _, body = _get(server, path)
    assert status == 404 and b"root:" not in body and b"model_variants" not in body


def test_symlink_out_of_the_experiment_is_refused(server, tmp_path):
    exp = server.RequestHandlerClass.data.exp
    outside = tmp_path / "outside"
    shutil.copytree(exp.projections_dir(VARIANT, JOY), outside / "joy")
    os.symlink(outside, exp.projections_dir(VARIANT) / "leak")
    data = _json(server, f"/api/projections?variant={VARIANT}&prompt_set={PROMPT_SET}&prompt_id=0&trait=leak/joy", 400)
    assert "outside the experiment folder" in data["error"]


def test_foreign_host_header_and_remote_bind_are_refused(server, tmp_path):
    status, _, body = _get(server, "/api/info", host="evil.example:80")
    assert status == 403 and "Host header" in json.loads(body)["error"]
    with pytest.raises(ValueError, match="allow_remote=True"):
        make_server(server.RequestHandlerClass.data.exp, host="0.0.0.0", port=0)


def test_allow_remote_without_a_token_is_refused_at_start(server):
    exp = server.RequestHandlerClass.data.exp
    for host in ("127.0.0.1", "0.0.0.0"):
        with pytest.raises(ValueError, match="allow_remote=True needs a token"):
            make_server(exp, host=host, port=0, allow_remote=True)
    with pytest.raises(ValueError, match="token must be a non-empty string or None; got ''"):
        make_server(exp, port=0, allow_remote=True, token="")


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def test_with_a_token_every_request_must_carry_it(tmp_path):
    exp = _write_experiment(tmp_path / "experiments")
    srv, thread = serve_in_thread(exp, verbose=False, allow_remote=True, token="s3cret")
    try:
        for auth in (None, "Bearer wrong", "s3cret", "Bearer ", _basic("me", "wrong"), "Basic !!not-base64"):
            for path in ("/", "/api/info"):
                status, _, body, res = _get(srv, path, headers={"Authorization": auth} if auth else {}, response=True)
                assert status == 401 and "missing or wrong token" in json.loads(body)["error"], (auth, path)
                assert res.getheader("WWW-Authenticate").startswith("Basic ")  # a browser then asks for the token
        for auth in ("Bearer s3cret", _basic("anyone", "s3cret")):  # a client, or a browser after its prompt
            assert _get(srv, "/", headers={"Authorization": auth})[0] == 200
            assert _get(srv, "/api/info", host="dashboard.example:80", headers={"Authorization": auth})[0] == 200
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(5)


@pytest.mark.parametrize("command", ["dashboard", "serve"])
def test_the_dashboard_command_and_its_serve_alias(command, tmp_path, monkeypatch, capsys):
    import tracelens.app.dashboard
    from tracelens import cli

    monkeypatch.setenv("TRACELENS_EXPERIMENTS", str(tmp_path))
    monkeypatch.delenv("TRACELENS_DASHBOARD_TOKEN", raising=False)
    assert cli.main([command, "--experiment", "exp", "--allow-remote", "--host", "0.0.0.0"]) == 2
    assert "allow_remote=True needs a token" in capsys.readouterr().err
    seen = {}
    monkeypatch.setattr(tracelens.app.dashboard, "serve", lambda experiment, **kw: seen.update(kw, experiment=experiment))
    assert cli.main([command, "--experiment", "exp", "--allow-remote", "--token", "s3cret"]) == 0
    assert seen == {"experiment": "exp", "host": "127.0.0.1", "port": 8000, "allow_remote": True, "token": "s3cret"}
    monkeypatch.setenv("TRACELENS_DASHBOARD_TOKEN", "from-env")
    assert cli.main([command, "--experiment", "exp"]) == 0 and seen["token"] == "from-env"


def test_corrupt_file_is_a_json_error_without_traceback(server):
    exp = server.RequestHandlerClass.data.exp
    exp.projection_path(VARIANT, CALM, PROMPT_SET, 0).write_text("{not json")
    data = _json(server, f"/api/projections?variant={VARIANT}&prompt_set={PROMPT_SET}&prompt_id=0&trait={CALM}", 500)
    assert "cannot read projections" in data["error"] and "Traceback" not in data["error"]


def test_extraction_and_steering_results(server):
    [ev] = _json(server, f"/api/extraction?variant={VARIANT}&trait={JOY}")["evaluations"]
    assert (ev["position_dir"], ev["position"], ev["component"], ev["methods"], ev["layers"]) == (
        "response__5", "response[:5]", "residual", ["mean_diff", "probe"], [1, 2])
    assert {k: ev[k] for k in ("splits", "chance", "results", "selected")} == {
        k: EVALUATION[k] for k in ("splits", "chance", "results", "selected")}
    [res] = _json(server, f"/api/steering?variant={VARIANT}&trait={JOY}")["results"]
    assert res["position_dir"] == "response__5" and res["baseline"]["trait_mean"] == 20.0
    assert res["judge"] == HEADER.eval and res["report"] == REPORT
    assert res["baseline_judge_free"]["nll"] == _est(2.0, 1.9, 2.1)
    assert [(r["layer"], r["coefficient"], r["trait_mean"], r["selected"]) for r in res["runs"]] == [
        (2, 2.0, 40.0, True), (2, 4.0, 60.0, False), (3, 2.0, 30.0, False)]  # sorted by layer, coefficient
    assert [r["judge_free"] for r in res["runs"]] == [RUNS[i].judge_free for i in (1, 0, 2)]
    assert [r["within_budget"] for r in res["runs"]] == [True, False, True]  # KL 0.04, 0.1, 0.025; budget 0.08
    assert res["selection"] == HEADER.selection and res["tradeoff_svg"].startswith("<svg")


def test_old_evaluation_format_is_a_clear_error(server):
    exp = server.RequestHandlerClass.data.exp
    write_json(exp.evaluation_path(JOY, VARIANT, "response[:5]", "residual"),
               {"trait": JOY, "results": [], "best": None})
    data = _json(server, f"/api/extraction?variant={VARIANT}&trait={JOY}", 500)
    assert "has no splits, chance, selected (an older format)" in data["error"]


def test_page_is_served_with_a_restrictive_csp(server):
    status, ctype, body = _get(server, "/")
    assert status == 200 and ctype.startswith("text/html") and b'id="clean"' in body
    status, ctype, body = _get(server, "/app.js")
    assert status == 200 and "javascript" in ctype and b"innerHTML" not in body


# --- the page in a real browser ------------------------------------------------------------------------


def _points(page) -> list[str]:
    return page.get_attribute(f'#trajectory polyline[data-trait="{JOY}"]', "points").split()


def _data(page, selector: str) -> list[dict]:
    """The data-* attributes of every element matching ``selector``, numbers parsed."""
    rows = page.eval_on_selector_all(selector, "els => els.map(e => ({...e.dataset}))")
    return [{k: v if v in ("true", "false") else _number_or_text(v) for k, v in r.items()} for r in rows]


def _number_or_text(value: str):
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value


def _check_extraction_charts(page) -> None:
    for method in ("probe", "mean_diff"):
        chart = f'svg.auroc-chart[data-method="{method}"]'
        points = _data(page, f"{chart} circle.point")
        want = [r for r in EVALUATION["results"] if r["method"] == method]
        assert [(p["layer"], p["auroc"], p["lo"], p["hi"], p["aboveChance"]) for p in points] == [
            (r["layer"], r["test"]["auroc"]["value"], r["test"]["auroc"]["lo"], r["test"]["auroc"]["hi"],
             str(r["above_chance"]).lower()) for r in want]
        band = EVALUATION["chance"]["layers"]
        [chance] = _data(page, f"{chart} polygon.chance")
        assert chance == {"layers": [1, 2], "lo": [band["1"]["auroc"]["lo"], band["2"]["auroc"]["lo"]],
                          "hi": [band["1"]["auroc"]["hi"], band["2"]["auroc"]["hi"]]}
        assert [(p["chanceLo"], p["chanceHi"]) for p in points] == [
            (band[k]["auroc"]["lo"], band[k]["auroc"]["hi"]) for k in ("1", "2")]
        assert page.locator(f"{chart} polyline.auroc").count() == 1
        assert page.locator(f"{chart} polygon.interval").count() == 1
    assert _data(page, "svg.auroc-chart line.selected") == [{"layer": 2}]  # probe's chart only
    assert page.locator('svg.auroc-chart[data-method="probe"] line.selected').count() == 1
    assert "0.9000 [0.8000, 0.9500]" in page.locator("table.extraction").text_content()


def _check_steering_chart(page) -> None:
    """The trade-off figure plots the stored numbers: every run at its KL, the controls' band, the budget."""
    chart = 'svg.tradeoff[data-layer="2"]'
    order = (1, 0, 2)  # runs are drawn by layer, then |coefficient|
    effect = f'{chart} g.panel[data-panel="trait_effect"]'
    steered = [p for p in _data(page, f"{effect} g.point") if p["series"] == "steered"]
    assert [(p["layer"], p["coefficient"], p["selected"]) for p in steered] == [
        (RUNS[i].layer, RUNS[i].coefficient, str(i == 1).lower()) for i in order]
    for p, i in zip(steered, order):
        te, kl = RUNS[i].judge_free["trait_effect"], RUNS[i].judge_free["kl"]
        assert (p["kl"], p["value"], p["lo"], p["hi"]) == (kl["value"], te["value"], te["lo"], te["hi"])
    judged = [p for p in _data(page, f'{chart} g.panel[data-panel="judge_trait"] g.point') if p["series"] == "steered"]
    assert [p["value"] for p in judged] == [RUNS[i].result.trait_mean for i in order]
    controls = [p for p in _data(page, f"{effect} g.point") if p["series"] == "control"]
    assert [(p["coefficient"], p["kl"], p["value"], p["lo"], p["hi"]) for p in controls] == [
        (c["coefficient"], c["band"]["kl"]["value"], *(c["band"]["trait_effect"][k] for k in ("value", "lo", "hi")))
        for c in CONTROL_CURVE]
    judged_controls = [p for p in _data(page, f'{chart} g.panel[data-panel="judge_trait"] g.point')
                       if p["series"] == "control"]
    assert [(p["coefficient"], p["kl"], p["value"], p["lo"], p["hi"]) for p in judged_controls] == [
        (c["coefficient"], c["band"]["kl"]["value"], *(c["judged"]["trait"][k] for k in ("value", "lo", "hi")))
        for c in CONTROL_CURVE]
    assert [b["kl"] for b in _data(page, f"{chart} line.budget")] == [0.08, 0.08]
    cells = page.locator("table.steering").text_content()
    assert "0.3000 [0.2500, 0.3500]" in cells and "over" in cells
    assert ("trait delta steered 35.0 [25.0, 45.0], prompted 30.0 [20.0, 40.0], random controls 2.0 [-3.0, 7.0]"
            in page.locator("#steering").text_content())


def test_page_in_headless_chromium(server, tmp_path):
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("playwright is not installed: pip install playwright "
                    "(the browser is Debian's chromium; do not run `playwright install`)")
    if not Path(CHROMIUM).is_file():
        pytest.fail(f"no browser at {CHROMIUM}: apt-get install -y chromium")
    url = f"http://127.0.0.1:{server.server_address[1]}/"
    shots = [tmp_path / "dashboard.png"]
    if os.environ.get("TRACELENS_ARTIFACTS"):
        shots.append(Path(os.environ["TRACELENS_ARTIFACTS"]) / "dashboard.png")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 900})
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(url)
            page.wait_for_selector("body[data-ready='1']", timeout=15000)
            page.select_option("#prompt", "1")  # its projections were never written: the page says so
            page.wait_for_function("() => document.getElementById('error').textContent.includes('no projections at')",
                                   timeout=10000)
            assert page.locator("#trajectory").count() == 0
            page.select_option("#prompt", "0")
            page.wait_for_selector(f'#trajectory polyline[data-trait="{JOY}"]', timeout=10000)
            assert len(_points(page)) == 5  # 3 prompt + 2 response tokens
            assert page.locator("#boundary").count() == 1
            values = json.loads(page.get_attribute(f'#trajectory polyline[data-trait="{JOY}"]', "data-values"))
            assert values == [1.0, 2.0, 3.0, 4.0, 5.0]
            assert page.locator("#tokens span.response").count() == 2

            raw_points = _points(page)
            page.select_option("#clean", "all")
            page.wait_for_selector("#trajectory[data-clean='all']", timeout=10000)
            values = json.loads(page.get_attribute(f'#trajectory polyline[data-trait="{JOY}"]', "data-values"))
            assert values == [-0.5, -0.5, -0.5, 3.0, 2.0]
            assert _points(page) != raw_points and len(_points(page)) == 5

            page.check(f'#traits input[data-trait="{CALM}"]')
            page.wait_for_function("() => document.querySelectorAll('#trajectory polyline').length === 2", timeout=10000)
            page.wait_for_selector("table.extraction td", timeout=10000)
            page.wait_for_selector("table.steering td", timeout=10000)
            _check_extraction_charts(page)
            _check_steering_chart(page)
            assert not page.locator("#error").text_content().strip()
            assert errors == [], errors
            for shot in shots:
                shot.parent.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    assert shots[0].stat().st_size > 1000
