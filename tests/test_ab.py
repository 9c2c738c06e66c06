"""A/B datasets: loading and its errors, letter tokens, propensity and activations against the HF reference,
the whole run, the SVG and the CLI."""

import json
import xml.etree.ElementTree as ET
from types import SimpleNamespace

import pytest
import torch

from tests.conftest import cached_tiny
from tests.hf_reference import hf_capture, hf_hooks
from tracelens.pipeline.ab import (
    ABConfig,
    ABDataError,
    ABItem,
    answer_activations,
    encode_items,
    letter_propensity,
    load_ab,
    run_ab,
)
from tracelens.pipeline.ab_plot import ab_verdict, propensity_markdown, propensity_svg
from tracelens.model.prompts import format_prompt


@pytest.fixture(scope="module")
def t():
    return cached_tiny("llama", n_layers=3)


@pytest.fixture(scope="module")
def starter():
    return load_ab("optimism")


def _write(tmp_path, rows, name="ab.jsonl"):
    path = tmp_path / name
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


CAA = {"question": "Is it good?\n\nChoices:\n (A) yes\n (B) no", "answer_matching_behavior": "(A)",
       "answer_not_matching_behavior": "(B)"}


def test_starter_set_has_80_unique_questions_with_balanced_letters(starter):
    assert len(starter) == 80 and starter.letter_balance() == {"A": 40, "B": 40}
    assert len({i.prompt for i in starter.items}) == 80
    assert all(i.answer_prefix == "(" and i.answer_suffix == ")" and not i.pre_formatted for i in starter.items)


@pytest.mark.parametrize("row, message", [
    ("{not json", r"line 2: malformed JSON"),
    ({"question": "q"}, r"line 2: expected keys .* \(CAA layout\) or \['positive', 'negative'\]"),
    ({**CAA, "answer_matching_behavior": "yes"}, r"line 2: answer_matching_behavior must be a letter"),
    ({**CAA, "answer_not_matching_behavior": "(A)"}, r"line 2: both answers are \(A\)"),
    ({**CAA, "answer_not_matching_behavior": "B"}, r"line 2: answers '\(A\)' and 'B' are written differently"),
    ({**CAA, "answer_not_matching_behavior": "(C)"}, r"line 2: the question has no option \(C\)"),
    ({"positive": "Answer: (A)", "negative": "Answer: (b)"}, r"line 2: .* differ only in the answer letter"),
    ({"positive": "Answer: (A)", "negative": "Answer: (A)"}, r"line 2: .* must differ in exactly one letter"),
    (CAA, r"line 2: the same question as .*line 1"),
])
def test_bad_rows_are_errors_naming_file_and_line(tmp_path, row, message):
    path = _write(tmp_path, [CAA, row])
    with pytest.raises(ABDataError, match=rf"^{tmp_path}/ab.jsonl, {message}"):
        load_ab(path)


def test_json_list_layout_and_unknown_names(tmp_path):
    path = tmp_path / "ab.json"
    path.write_text(json.dumps([CAA]))
    assert load_ab(path).items[0].matching == "A"
    with pytest.raises(FileNotFoundError, match=r"one of \['optimism'\]"):
        load_ab("nope")


def test_pair_layout_gives_the_same_tokens_as_the_caa_layout(t, starter, tmp_path):
    items = starter.items[:6]
    rows = [{"positive": format_prompt(t.tokenizer, i.prompt) + f"({i.matching})",
             "negative": format_prompt(t.tokenizer, i.prompt) + f"({i.not_matching})"} for i in items]
    pairs = load_ab(_write(tmp_path, rows))
    assert [(p.matching, p.not_matching) for p in pairs.items] == [(i.matching, i.not_matching) for i in items]
    assert all(p.pre_formatted and p.answer_suffix == ")" for p in pairs.items)
    assert encode_items(t.tokenizer, pairs) == encode_items(t.tokenizer, items)


class _MergingTokenizer:
    """Characters as tokens, except that "(A" is one token (as some BPE vocabularies have it)."""

    bos_token = bos_token_id = chat_template = None

    def __call__(self, text, add_special_tokens=True):
        return SimpleNamespace(input_ids=[ord(c) for c in text.replace("(A", "\x00")])


def test_a_letter_merged_into_the_previous_token_is_an_error():
    item = ABItem("Q", "B", "A", answer_prefix="(", pre_formatted=True, source="f.jsonl, line 3")
    with pytest.raises(ABDataError, match=r"^f.jsonl, line 3: the tokenizer does not give 'A' its own token"):
        encode_items(_MergingTokenizer(), [item])
    [ok] = encode_items(_MergingTokenizer(), [ABItem("Q", "B", "C", pre_formatted=True)])
    assert ok.letter_ids == (ord("B"), ord("C"))


def _reference_letter_probs(t, e, edit=None):
    ids = torch.tensor([e.prefix])
    with hf_hooks(t.reference, edit or {}), torch.no_grad():
        p = t.reference(ids).logits[0, -1].softmax(-1)
    m, n = e.letter_ids
    return float(p[m] / (p[m] + p[n])), float(p[m] + p[n])


def test_propensity_matches_the_hf_reference_in_padded_batches_with_and_without_steering(t, starter):
    encoded = encode_items(t.tokenizer, starter.items[:5])
    assert len({len(e.prefix) for e in encoded}) > 1  # the batch is padded
    v = torch.randn(64, generator=torch.Generator().manual_seed(0))
    p, mass = letter_propensity(t.model, encoded, [v, v, v], layer=1, multipliers=[-3.0, 0.0, 3.0], batch_size=4)
    assert p.shape == mass.shape == (3, 5)
    for k, m in enumerate([-3.0, 0.0, 3.0]):
        edit = {"model.layers.1": lambda h, m=m: h + m * v}
        for i, e in enumerate(encoded):
            ref_p, ref_mass = _reference_letter_probs(t, e, edit)
            assert p[k, i].item() == pytest.approx(ref_p, abs=1e-5)
            assert mass[k, i].item() == pytest.approx(ref_mass, rel=1e-4)
    assert (p[0] - p[2]).abs().max() > 1e-3  # the steering matters


def test_answer_activations_read_the_letter_token(t, starter):
    encoded = encode_items(t.tokenizer, starter.items[:3])
    pos, neg = answer_activations(t.model, encoded, [0, 1], batch_size=2)
    after, _ = answer_activations(t.model, encoded, [1], read="after")
    for i, e in enumerate(encoded):
        k = len(e.prefix)
        for acts, row in ((pos, e.matching), (neg, e.not_matching)):
            _, got = hf_capture(t.reference, torch.tensor([row]), None, ["model.layers.0", "model.layers.1"])
            assert torch.allclose(acts[i, 0], got["model.layers.0"][0, k], atol=1e-5)
            assert torch.allclose(acts[i, 1], got["model.layers.1"][0, k], atol=1e-5)
        _, got = hf_capture(t.reference, torch.tensor([e.matching]), None, ["model.layers.1"])
        assert torch.allclose(after[i, 0], got["model.layers.1"][0, k + 1], atol=1e-5)
    with pytest.raises(ValueError, match=r"read must be one of \['after', 'letter'\]"):
        answer_activations(t.model, encoded, [0], read="before")


@pytest.fixture(scope="module")
def result(t, starter):
    return run_ab(t.model, starter, ABConfig(layers=[0, 2], multipliers=(-4.0, 4.0), n_random=10, batch_size=32))


def test_run_ab_vectors_curves_and_splits(t, starter, result):
    r = result.report
    assert r["splits"] == {"train": 40, "select": 8, "test": 32} and r["multipliers"] == [-4.0, 0.0, 4.0]
    encoded = encode_items(t.tokenizer, starter)
    from tracelens.datasets.splits import split_by_question

    train = split_by_question([i.prompt for i in starter.items], (0.5, 0.1, 0.4))["train"]
    letters = [starter.items[i].matching for i in train]
    m = min(letters.count("A"), letters.count("B"))
    train = [i for i in train if starter.items[i].matching == "A"][:m] + [i for i in train if starter.items[i].matching == "B"][:m]
    assert r["train_letters"] == {"A": m, "B": m}
    for layer in (0, 2):
        entry = r["layers"][str(layer)]
        pos, neg = answer_activations(t.model, [encoded[i] for i in train], [layer])
        assert torch.allclose(result.vectors[layer], pos.mean(0)[0] - neg.mean(0)[0], atol=1e-5)  # mean_diff = CAA
        assert entry["scale"] == pytest.approx(float(result.vectors[layer].norm()), abs=1e-4)
        assert entry["curve"][1]["p_match"] == entry["control"][1]["p_match"] == r["unsteered"]["p_match"]
        assert entry["curve"][0]["p_match"] != entry["curve"][2]["p_match"]
        for point in entry["curve"] + entry["control"]:
            e = point["p_match"]
            assert 0 <= e["lo"] <= e["value"] <= e["hi"] <= 1
        assert set(entry["detection"]) == {"select", "test"} and set(entry["chance"]) == {"auroc", "accuracy"}
    assert r["selected"]["layer"] in (0, 2)


def test_balance_letters_keeps_equal_counts_and_needs_both_letters(starter):
    from tracelens.pipeline.ab import ABDataset, balance_letters

    kept = balance_letters(range(10), starter)  # items alternate A, B
    assert kept == list(range(10))
    assert balance_letters([0, 1, 2, 4, 6], starter) == [0, 1]  # A, B, A, A, A: one of each
    only_a = ABDataset(tuple(i for i in starter.items if i.matching == "A")[:3], "a.jsonl")
    with pytest.raises(ValueError, match=r"the train questions all match letter \['A'\]"):
        balance_letters(range(3), only_a)


def test_multipliers_need_both_signs(t, starter):
    with pytest.raises(ValueError, match=r"multipliers need both signs"):
        run_ab(t.model, starter, ABConfig(layers=[0], multipliers=(1.0, 2.0)))


def test_svg_draws_every_layer_and_point_where_the_numbers_say(result):
    svg = propensity_svg(result.report)
    root = ET.fromstring(svg)
    ns = "{http://www.w3.org/2000/svg}"
    panels = root.findall(f"{ns}g[@class='panel']")
    assert [p.get("data-layer") for p in panels] == ["0", "2"]
    for panel in panels:
        entry = result.report["layers"][panel.get("data-layer")]
        points = panel.findall(f"{ns}g[@class='point']")
        assert sorted(p.get("data-series") for p in points) == ["control", "control", "curve", "curve", "unsteered"]
        ys = {}
        for p in points:
            series = p.get("data-series")
            k = result.report["multipliers"].index(float(p.get("data-multiplier")))
            expected = entry["curve" if series == "unsteered" else series][k]["p_match"]
            assert float(p.get("data-value")) == expected["value"]
            ys[(series, k)] = (expected["value"], float(p.find(f"{ns}circle").get("cy")))
        (v1, y1), (v2, y2) = ys[("curve", 0)], ys[("curve", 2)]
        assert (v1 - v2) * (y2 - y1) >= 0  # higher propensity is drawn higher (smaller y)


def test_cli_writes_report_vectors_and_svg(t, tmp_path, capsys):
    from tracelens.cli import main
    from tracelens.io import load_tensors

    folder = tmp_path / "model"
    t.reference.save_pretrained(folder)
    t.tokenizer.save_pretrained(folder)
    assert main(["ab", "--model", str(folder), "--layers", "1", "--multipliers=-1,1", "--n-random", "5",
                 "--out", str(tmp_path / "out")]) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert sorted(report["layers"]) == ["1"] and report["multipliers"] == [-1.0, 0.0, 1.0]  # 0: unsteered
    vectors = load_tensors(tmp_path / "out" / "vectors.safetensors")
    assert list(vectors) == ["1"] and vectors["1"].shape == (t.model.cfg.d_model,)
    assert ET.fromstring((tmp_path / "out" / "propensity.svg").read_text()) is not None
    out = capsys.readouterr().out
    assert "layer 1: test AUROC" in out and f"wrote {tmp_path / 'out'}" in out
    # what reproduces it: the model as given, the data relative to the package's folder, the command line
    assert report["model"] == str(folder) and report["dataset"] == "tracelens/data/ab/optimism.jsonl"
    assert len(report["data_sha256"]) == 16
    command = f"tracelens ab --model {folder} --layers 1 --multipliers=-1,1 --n-random 5 --out {tmp_path / 'out'}"
    assert report["command"] == command
    md = (tmp_path / "out" / "propensity.md").read_text().splitlines()
    assert md[0] == f"- Command: `{command}`" and md[1].startswith("- tracelens version: ")
    assert any(line.startswith("**Result: ") for line in md)


def test_table_renders_every_layer_with_its_numbers(result):
    md = propensity_markdown(result.report)
    for layer, e in result.report["layers"].items():
        [row] = [line for line in md.splitlines() if line.startswith(f"| {layer} | ") and "[" in line]
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[1].startswith(f"{e['detection']['test']['auroc']['value']:.3f} [")
        assert cells[5] == f"{e['effect']['value']:.3f} [{e['effect']['lo']:.3f}, {e['effect']['hi']:.3f}]"
        assert cells[6].startswith(f"{e['control_effect']['value']:.3f} [")
    assert f"{result.report['unsteered']['p_match']['value']:.3f}" in md


def _edited(report, layer, auroc_lo, effect, control):
    """`report` with layer `layer`'s test AUROC lower end, effect and control effect (value, lo, hi) replaced."""
    r = json.loads(json.dumps(report))
    e = r["layers"][layer]
    e["detection"]["test"]["auroc"]["lo"] = auroc_lo
    e["effect"], e["control_effect"] = ({"value": v, "lo": lo, "hi": hi} for v, lo, hi in (effect, control))
    return r


def test_the_verdict_follows_the_numbers(result):
    base = result.report
    null = _edited(_edited(base, "0", 0.0, (-0.03, -0.05, -0.01), (0.0, -0.01, 0.01)),
                   "2", 0.0, (0.02, 0.01, 0.03), (0.03, 0.02, 0.04))  # 2 moves up, but no more than its control
    text = "\n".join(ab_verdict(null))
    assert text.startswith("**Result: null.** No layer both detects")
    assert "0 of 2 layers have an effect above 0 and above their random control's (layers: none); 1 moves p(match) " \
           "the wrong way (layers: 0)" in text
    assert "moves p(match) (its interval excludes 0) at layer(s) 2" in text
    good = _edited(null, "2", 0.99, (0.2, 0.1, 0.3), (0.0, -0.01, 0.01))
    good["layers"]["2"]["chance"]["auroc"]["hi"] = 0.7
    good["selected"]["layer"] = 2
    text = "\n".join(ab_verdict(good))
    assert text.startswith("**Result: the direction detects and steers the behaviour at layer(s) 2.**")
    assert "selected on the select split (select auroc), 2, has test AUROC" in text
    assert "above the random band" in text and "in the intended direction" in text
    assert ab_verdict(good)[0] in propensity_markdown(good).splitlines()
