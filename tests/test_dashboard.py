"""The Trait Dynamics dashboard: massive-dim cleaning, the JSON API, and one real headless-Chromium check."""

import http.client
import json
import os
import shutil
from pathlib import Path

import pytest

from tracelens.cleaning import clean_scores, dims_for_mode
from tracelens.dashboard import make_server, serve_in_thread
from tracelens.experiments import Experiment
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
    rows = [{"method": m, "layer": l, "val_accuracy": acc, "val_auroc": acc, "effect_size": 1.0,
             "polarity_correct": True}
            for m, base in (("probe", 0.8), ("mean_diff", 0.7)) for l, acc in ((1, base), (2, base + 0.1))]
    write_json(exp.evaluation_path(JOY, VARIANT, "response[:5]", "residual"),
               {"trait": JOY, "results": rows, "best": rows[1]})
    runs = [SteeringRunRecord(JudgeResult(trait_mean=t, coherence_mean=c, n=5),
                              ProjectionConfig.single(layer, "residual", "response[:5]", "probe", coef))
            for layer, coef, t, c in ((2, 4.0, 60.0, 85.0), (2, 2.0, 40.0, 90.0), (3, 2.0, 30.0, 88.0))]
    SteeringResults(SteeringHeader(JOY), JudgeResult(trait_mean=20.0, coherence_mean=92.0, n=5), runs).save(
        exp.steering_results_path(JOY, VARIANT, "response[:5]"))
    return exp


@pytest.fixture
def server(tmp_path):
    exp = _write_experiment(tmp_path / "experiments")
    srv, thread = serve_in_thread(exp, verbose=False)
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join(5)


def _get(server, path: str, host: str | None = None):
    port = server.server_address[1]
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", path, headers={"Host": host or f"127.0.0.1:{port}"})
    res = conn.getresponse()
    body = res.read()
    conn.close()
    return res.status, res.getheader("Content-Type"), body


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


def test_corrupt_file_is_a_json_error_without_traceback(server):
    exp = server.RequestHandlerClass.data.exp
    exp.projection_path(VARIANT, CALM, PROMPT_SET, 0).write_text("{not json")
    data = _json(server, f"/api/projections?variant={VARIANT}&prompt_set={PROMPT_SET}&prompt_id=0&trait={CALM}", 500)
    assert "cannot read projections" in data["error"] and "Traceback" not in data["error"]


def test_extraction_and_steering_results(server):
    [ev] = _json(server, f"/api/extraction?variant={VARIANT}&trait={JOY}")["evaluations"]
    assert (ev["position_dir"], ev["component"], ev["methods"], ev["layers"]) == (
        "response__5", "residual", ["mean_diff", "probe"], [1, 2])
    assert {(r["method"], r["layer"]): r["val_accuracy"] for r in ev["results"]} == pytest.approx(
        {("probe", 1): 0.8, ("probe", 2): 0.9, ("mean_diff", 1): 0.7, ("mean_diff", 2): 0.8})
    [res] = _json(server, f"/api/steering?variant={VARIANT}&trait={JOY}")["results"]
    assert res["position_dir"] == "response__5" and res["baseline"]["trait_mean"] == 20.0
    assert [(s["layer"], [(p["coefficient"], p["trait_mean"], p["coherence_mean"]) for p in s["points"]])
            for s in res["series"]] == [(2, [(2.0, 40.0, 90.0), (4.0, 60.0, 85.0)]), (3, [(2.0, 30.0, 88.0)])]


def test_page_is_served_with_a_restrictive_csp(server):
    status, ctype, body = _get(server, "/")
    assert status == 200 and ctype.startswith("text/html") and b'id="clean"' in body
    status, ctype, body = _get(server, "/app.js")
    assert status == 200 and "javascript" in ctype and b"innerHTML" not in body


# --- the page in a real browser ------------------------------------------------------------------------


def _points(page) -> list[str]:
    return page.get_attribute(f'#trajectory polyline[data-trait="{JOY}"]', "points").split()


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
            assert not page.locator("#error").text_content().strip()
            assert errors == [], errors
            for shot in shots:
                shot.parent.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    assert shots[0].stat().st_size > 1000
