"""docs/porting.md: every ported block of the seed's quick reference runs, in order, on an extracted tiny model."""

import importlib.util
import re
import shlex
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow  # one extraction plus every seed block on a 17-layer tiny model: about a minute

from tracelens.serving.backends import LocalBackend
from tracelens.cli import main as cli_main
from tracelens.store import Experiment
from tracelens.pipeline.extraction import ExtractionConfig, run_extraction
from tracelens.testing import tiny_model

DOC = Path(__file__).parents[1] / "docs" / "porting.md"
BLOCK = re.compile(r"```(python|bash)\n(.*?)```", re.S)


def _blocks() -> list[tuple[str, str]]:
    return BLOCK.findall(DOC.read_text())


@pytest.fixture(scope="module")
def extracted(tmp_path_factory):
    """A tiny 17-layer Llama saved to a folder, an experiment pointing at it, and one extraction run."""
    root = tmp_path_factory.mktemp("porting")
    t = tiny_model("llama", n_layers=17)
    t.reference.save_pretrained(root / "model")
    t.tokenizer.save_pretrained(root / "model")
    exp = Experiment.named("my_exp", root / "experiments")
    exp.write_config({"base": {"model": str(root / "model")}}, {"extraction": "base", "application": "base"})
    config = ExtractionConfig(methods=("probe",), position="response[:]", max_new_tokens=2, limit=12)
    run_extraction(exp, ["starter/optimism"], config, backend=LocalBackend.from_model(t.model))
    return root


SEED_SECTIONS = ["Types", "Hooks", "Generation with hooks", "Extraction methods", "Math functions",
                 "Massive activations", "GPU profiling", "Generation backend"]
EXTRA_SECTIONS = ["Differences from the seed"]


def test_the_doc_has_a_section_per_section_of_the_seed_quick_reference():
    headings = re.findall(r"^## (.+)$", DOC.read_text(), re.M)
    assert headings == ["Setup", *SEED_SECTIONS, *EXTRA_SECTIONS]


def test_every_ported_block_runs_in_order(extracted, monkeypatch, capsys):
    monkeypatch.setenv("TRACELENS_EXPERIMENTS", str(extracted / "experiments"))
    monkeypatch.chdir(extracted)
    namespace: dict = {}
    ran = 0
    for language, code in _blocks():
        if "VLLMBackend(" in code and not (importlib.util.find_spec("vllm") and torch.cuda.is_available()):
            continue  # CUDA + vLLM only
        if language == "bash":
            for line in code.strip().splitlines():
                assert line.startswith("tracelens "), line
                assert cli_main(shlex.split(line)[1:]) == 0
        else:
            exec(compile(code, f"{DOC.name} block {ran}", "exec"), namespace)
        ran += 1
    assert ran >= len(_blocks()) - 1
    ns = namespace
    d = ns["model"].cfg.d_model
    assert ns["all_acts"][16].shape == (*ns["inputs"]["input_ids"].shape, d)
    assert ns["activations"][16]["residual"].shape == (*ns["input_ids"].shape, d)
    assert sorted(ns["all_acts"]) == [14, 15, 16] and ns["acts"].shape == (2, d)
    assert ns["meta"].n_layers == 17 and ns["best"].source == "evaluation"
    assert ns["results"][0].response_activations[14]["residual"].shape[1] == d
    assert len(ns["responses"]) == 2 and ns["vector"].norm().item() == pytest.approx(1.0, abs=1e-5)
    assert (extracted / "experiments" / "my_exp" / "inference" / "base" / "massive_activations").is_dir()
    # The seed's HF call forms: model(**inputs) under hooks, model.generate(**inputs) -> [batch, prompt + new] ids.
    ids = ns["inputs"]["input_ids"]
    assert ns["output"].shape[0] == 2 and torch.equal(ns["output"][:, : ids.shape[1]], ids)
    assert ns["greedy"].shape == (2, ids.shape[1] + 4) and ns["sampled"].shape == ns["greedy"].shape
    assert torch.equal(ns["wrapped_acts"], ns["all_acts"][16])  # an HF model wrapped by load_model: the same hooks
    assert set(ns["stats"]) >= {"allocated", "reserved", "free", "total"}
    # Differences from the seed, each pair checked.
    assert len(ns["original"]) == 2 and all(1 <= len(o.token_ids) <= 8 for o in ns["original"])
    with torch.no_grad():
        assert torch.equal(ns["seed_per_position_output"], ns["model"].generate(**ns["inputs"]))
    padded, real = ns["padded"], ns["real"]
    assert padded.shape == (2, 2, real.shape[1], d) and torch.allclose(padded, ns["every_token"], atol=1e-5)
    lengths = real.sum(1, keepdim=True)
    assert lengths.unique().numel() == 2 and torch.equal(real, torch.arange(real.shape[1]) < lengths)
    assert not padded[int(lengths.argmin()), :, int(lengths.min()):].any()  # the shorter slice is zero-padded
    assert ns["vector_a"].dtype == torch.float32 and not torch.equal(ns["vector_a"], ns["vector_b"])
    assert torch.equal(ns["vector_a"], ns["get_method"]("gradient").extract(ns["pos_acts"], ns["neg_acts"])["vector"])
