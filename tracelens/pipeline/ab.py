"""A/B behaviour datasets: loading, extraction at the answer letter, detection and propensity curves.

Two layouts, one JSON object per line (`.jsonl`) or a JSON list (`.json`):

- CAA (Rimsky et al., `nrimsky/CAA`): `{"question": "...(A) ...(B) ...", "answer_matching_behavior": "(A)",
  "answer_not_matching_behavior": "(B)"}`. The question goes through the chat template and the assistant
  turn starts with the answer's opening "(".
- pair (steering-vectors / repeng style): `{"positive": text, "negative": text}`, two complete texts that
  differ only in the chosen letter. The text before the letter is used as is (format it yourself).

The propensity of a question is `p(match) / (p(match) + p(not match))`, read from the next-token
distribution at the position before the letter; a curve is its mean over held-out questions against the
steering multiplier, with bootstrap intervals over questions and a random direction of the same norm (seeded
from its own stream, never the chance band's or `random_baseline`'s draw). `save_ab` writes the report, the
vectors, the SVG and `propensity.md`, whose opening lines name the command and state the result.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import torch
from jaxtyping import Float
from torch import Tensor

from tracelens.io import json_object, read_json, read_json_lines, save_tensors, write_bytes, write_json
from tracelens.model.capture import capture_sequences
from tracelens.errors import ABDataError, ConfigError, MissingArtifactError
from tracelens.pipeline.extraction import chance_band, derived_seed, parse_layers
from tracelens.model.hooks import PerSampleSteering
from tracelens.methods import get_method
from tracelens.metrics import bootstrap_mean, paired_separation
from tracelens.model.prompts import encode, format_prompt, left_pad
from tracelens.datasets.splits import split_by_question
from tracelens.pipeline.steering_eval import random_control

DATA_DIR = Path(str(resources.files("tracelens").joinpath("data", "ab")))
CONTROL_STREAM = "ab control"  # the random control's seed stream (`derived_seed`)
READ_POSITIONS = {"letter": "response[0]", "after": "response[1]"}
_ANSWER = re.compile(r"^\s*(\(?)([A-Z])(\)?)\s*$")


@dataclass(frozen=True)
class ABItem:
    """One question. The model sees `prefix + letter + answer_suffix`, where `prefix` is `prompt`
    (through the chat template unless `pre_formatted`) followed by `answer_prefix`."""

    prompt: str
    matching: str
    not_matching: str
    answer_prefix: str = "("
    answer_suffix: str = ")"
    pre_formatted: bool = False
    source: str = ""  # "file, line N", for error messages

    def prefix(self, tokenizer) -> str:
        text = self.prompt if self.pre_formatted else format_prompt(tokenizer, self.prompt)
        return text + self.answer_prefix


@dataclass(frozen=True)
class ABDataset:
    """Items of one file, in file order; `letter_balance()` counts the matching letters."""

    items: tuple[ABItem, ...]
    path: str

    def __len__(self) -> int:
        return len(self.items)

    def letter_balance(self) -> dict[str, int]:
        return dict(sorted(Counter(item.matching for item in self.items).items()))


@dataclass(frozen=True)
class EncodedItem:
    """Token ids of one item: `prefix` and the two full answers (`prefix + letter + suffix`)."""

    prefix: list[int]
    matching: list[int]
    not_matching: list[int]

    @property
    def letter_ids(self) -> tuple[int, int]:
        """Token ids of the matching and not-matching letter."""
        k = len(self.prefix)
        return self.matching[k], self.not_matching[k]


def load_ab(source: str | Path) -> ABDataset:
    """Load an A/B file (path, or the name of a shipped set such as "optimism"); errors name file and line."""
    path = Path(source)
    if not path.exists() and (DATA_DIR / f"{source}.jsonl").is_file():
        path = DATA_DIR / f"{source}.jsonl"
    if not path.is_file():
        shipped = sorted(p.stem for p in DATA_DIR.glob("*.jsonl"))
        raise MissingArtifactError(f"no A/B dataset at {source!r}; give a .jsonl/.json path or one of {shipped}")
    if path.suffix == ".json":
        rows = read_json(path, ABDataError, hint="")
        if not isinstance(rows, list):
            raise ABDataError(f"{path}: a .json A/B file must hold a list of objects; got {type(rows).__name__}")
        lines = [(f"{path}, item {i}", row) for i, row in enumerate(rows)]
    else:
        lines = read_json_lines(path, ABDataError, hint="")
    if not lines:
        raise ABDataError(f"{path} has no items")
    items = tuple(_parse_item(where, row) for where, row in lines)
    seen: dict[str, str] = {}
    for item in items:
        if item.prompt in seen:
            raise ABDataError(f"{item.source}: the same question as {seen[item.prompt]}; questions must be unique "
                              "(splits are by question)")
        seen[item.prompt] = item.source
    return ABDataset(items, str(path))


def _parse_item(where: str, row) -> ABItem:
    json_object(row, where, None, error=ABDataError)
    caa = ("question", "answer_matching_behavior", "answer_not_matching_behavior")
    if all(k in row for k in caa):
        return _parse_caa(where, *(row[k] for k in caa))
    if "positive" in row and "negative" in row:
        return _parse_pair(where, row["positive"], row["negative"])
    raise ABDataError(f"{where}: expected keys {list(caa)} (CAA layout) or ['positive', 'negative'] (pair layout); "
                      f"got {sorted(row)}")


def _parse_caa(where: str, question, matching, not_matching) -> ABItem:
    if not isinstance(question, str) or not question.strip():
        raise ABDataError(f"{where}: 'question' must be a non-empty string")
    parsed = []
    for key, answer in (("answer_matching_behavior", matching), ("answer_not_matching_behavior", not_matching)):
        m = _ANSWER.match(answer) if isinstance(answer, str) else None
        if not m:
            raise ABDataError(f"{where}: {key} must be a letter like '(A)' or 'A'; got {answer!r}")
        parsed.append(m.groups())
    (open_m, letter_m, close_m), (open_n, letter_n, close_n) = parsed
    if letter_m == letter_n:
        raise ABDataError(f"{where}: both answers are ({letter_m}); the two letters must differ")
    if (open_m, close_m) != (open_n, close_n):
        raise ABDataError(f"{where}: answers {matching!r} and {not_matching!r} are written differently; use one form")
    if open_m:
        missing = [f"({x})" for x in (letter_m, letter_n) if f"({x})" not in question]
        if missing:
            raise ABDataError(f"{where}: the question has no option {', '.join(missing)}")
    return ABItem(question, letter_m, letter_n, open_m, close_m, False, where)


def _parse_pair(where: str, positive, negative) -> ABItem:
    if not isinstance(positive, str) or not isinstance(negative, str):
        raise ABDataError(f"{where}: 'positive' and 'negative' must be strings")
    if len(positive) != len(negative) or positive == negative:
        raise ABDataError(f"{where}: 'positive' and 'negative' must differ in exactly one letter (same length)")
    diff = [i for i, (a, b) in enumerate(zip(positive, negative)) if a != b]
    i = diff[0]
    if len(diff) != 1 or not (positive[i].isupper() and negative[i].isupper()):
        shown = ", ".join(f"{positive[j]!r}/{negative[j]!r} at {j}" for j in diff[:3])
        raise ABDataError(f"{where}: 'positive' and 'negative' must differ only in the answer letter (A-Z); "
                          f"they differ at {shown}")
    return ABItem(positive[:i], positive[i], negative[i], "", positive[i + 1:], True, where)


def encode_items(tokenizer, dataset: ABDataset | Sequence[ABItem]) -> list[EncodedItem]:
    """Tokenize every item; the letter must be one token right after the prefix's tokens (else ABDataError)."""
    out = []
    for item in getattr(dataset, "items", dataset):
        prefix_text = item.prefix(tokenizer)
        prefix = encode(tokenizer, prefix_text)
        full = []
        for letter in (item.matching, item.not_matching):
            ids = encode(tokenizer, prefix_text + letter + item.answer_suffix)
            if ids[: len(prefix)] != prefix or encode(tokenizer, prefix_text + letter) != ids[: len(prefix) + 1]:
                raise ABDataError(
                    f"{item.source}: the tokenizer does not give {letter!r} its own token after "
                    f"{prefix_text[-20:]!r}; end the text before the letter with a separator such as '(' or ' '"
                )
            full.append(ids)
        out.append(EncodedItem(prefix, *full))
    return out


# --- activations and propensity ---------------------------------------------------------------------


def answer_activations(model, encoded: Sequence[EncodedItem], layers: Sequence[int], read: str = "letter",
                       component: str = "residual", batch_size: int = 16
                       ) -> tuple[Float[Tensor, "n n_layers d"], Float[Tensor, "n n_layers d"]]:
    """Activations of the matching and not-matching completions at the letter token (`read="letter"`) or
    the token after it (`"after"`, e.g. ")"), float32 on CPU. (Tokens before the letter are shared by both
    completions of a causal model, so they cannot contrast them.)"""
    if read not in READ_POSITIONS:
        raise ConfigError(f"read must be one of {sorted(READ_POSITIONS)}; got {read!r}")
    rows = [e.matching for e in encoded] + [e.not_matching for e in encoded]
    lens = [len(e.prefix) for e in encoded] * 2
    acts = capture_sequences(model, rows, lens, list(layers), READ_POSITIONS[read], "first", component, batch_size)
    return acts[: len(encoded)], acts[len(encoded):]


def letter_propensity(model, encoded: Sequence[EncodedItem], vectors: Sequence[Tensor] | None = None,
                      layer: int | None = None, multipliers: Sequence[float] = (0.0,), component: str = "residual",
                      batch_size: int = 16) -> tuple[Float[Tensor, "n_mult n"], Float[Tensor, "n_mult n"]]:
    """`(p_match, mass)` per multiplier and item: `p(match) / (p(match) + p(not))` and `p(match) + p(not)`
    from the next-token distribution after the prefix, with `multiplier * vectors[k]` added at every position
    of `layer` (`vectors` one per multiplier, or None for no steering). Rows of all multipliers share batches."""
    if vectors is not None and (layer is None or len(vectors) != len(multipliers)):
        raise ConfigError(f"steering needs a layer and one vector per multiplier; got layer={layer}, "
                         f"{len(vectors)} vectors for {len(multipliers)} multipliers")
    rows = [(k, i) for k in range(len(multipliers)) for i in range(len(encoded))]
    pad_id = getattr(model.tokenizer, "pad_token_id", None) or 0
    device = model.cfg.device
    probs = torch.empty(len(rows), 2)
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        ids, mask = left_pad([encoded[i].prefix for _, i in chunk], pad_id)
        configs = []
        if vectors is not None:
            for k in sorted({k for k, _ in chunk}):
                rs = [r for r, (kk, _) in enumerate(chunk) if kk == k]  # contiguous: rows are ordered by multiplier
                if multipliers[k] != 0:
                    configs.append((layer, vectors[k], float(multipliers[k]), (rs[0], rs[-1] + 1)))
        steer = PerSampleSteering(model, configs, component) if configs else contextlib.nullcontext()
        with steer, torch.inference_mode():  # the bridge's hooks fire inside its HF model; keep only the last logits
            positions = (mask.cumsum(1) - 1).clamp(min=0)  # left padding: count from each row's first token
            logits = model.original_model(input_ids=ids.to(device), attention_mask=mask.to(device),
                                          position_ids=positions.to(device), logits_to_keep=1).logits[:, -1].float()
        p = logits.softmax(-1).cpu()
        letters = torch.tensor([encoded[i].letter_ids for _, i in chunk])
        probs[start : start + len(chunk)] = p.gather(1, letters)
    probs = probs.view(len(multipliers), len(encoded), 2)
    mass = probs.sum(-1)
    return probs[..., 0] / mass, mass


# --- the whole run ----------------------------------------------------------------------------------


@dataclass
class ABConfig:
    """Settings of `run_ab`. Multipliers are in units of the train mean difference along the direction:
    1.0 adds `u * <mean(pos) - mean(neg), u>` (for mean_diff exactly the mean difference, as in CAA)."""

    layers: str | Sequence[int] = "all"
    method: str = "mean_diff"
    read: str = "letter"
    component: str = "residual"
    multipliers: Sequence[float] = (-2.0, -1.0, -0.5, 0.5, 1.0, 2.0)
    fractions: Sequence[float] = (0.5, 0.1, 0.4)
    seed: int = 0
    n_random: int = 100
    batch_size: int = 16


@dataclass
class ABResult:
    """`report` (JSON-ready numbers, see `run_ab`) and the steering `vectors` by layer (scaled, see `ABConfig`)."""

    report: dict
    vectors: dict[int, Tensor] = field(default_factory=dict)


def balance_letters(indices: Sequence[int], dataset: ABDataset) -> list[int]:
    """The first `m` of `indices` for each matching letter, `m` the rarest letter's count: at the letter token the
    letter's own identity dominates the activation, so a train set with more A- than B-matching questions would
    give a direction that is partly "A minus B"."""
    by_letter: dict[str, list[int]] = {}
    for i in indices:
        by_letter.setdefault(dataset.items[i].matching, []).append(i)
    if len(by_letter) < 2:
        raise ConfigError(f"the train questions all match letter {list(by_letter)}; the A/B set needs both letters")
    m = min(len(ix) for ix in by_letter.values())
    return sorted(i for ix in by_letter.values() for i in ix[:m])


def data_source(dataset: ABDataset) -> dict[str, str]:
    """Where a report says its data came from, never an absolute path: `dataset` relative to the folder holding
    the tracelens package (a checkout's root: "tracelens/data/ab/optimism.jsonl") when inside it, else to the
    working folder; and `data_sha256`, the first 16 hex digits of the file's SHA-256."""
    path, root = Path(dataset.path).resolve(), DATA_DIR.resolve().parents[2]
    shown = path.relative_to(root) if path.is_relative_to(root) else Path(os.path.relpath(path))
    return {"dataset": shown.as_posix(), "data_sha256": hashlib.sha256(path.read_bytes()).hexdigest()[:16]}


def run_ab(model, dataset: ABDataset, config: ABConfig | None = None, model_id: str | None = None) -> ABResult:
    """Extract a direction per layer on the train questions (balanced by matching letter), score detection on select and test (AUROC,
    accuracy at the train midpoint, Cohen's d; bootstrap over questions; random-direction chance band), and
    measure propensity curves on the test questions for the vector and a random direction of the same norm.

    Report: `model` (`model_id` as given, e.g. "default"; None if not given), the data (`data_source`), and
    `layers[str(L)]` holds `detection`, `chance`, `scale` (vector norm), `curve` / `control` (one
    point per multiplier, 0 = the unsteered point, each `p_match` and `mass` with intervals), `effect` /
    `control_effect` (per-question `p(max m) - p(min m)`) and `steerable` (share of questions that move up).
    """
    config = config or ABConfig()
    multipliers = sorted({float(m) for m in config.multipliers} | {0.0})
    if len(multipliers) < 3 or multipliers[0] >= 0 or multipliers[-1] <= 0:
        raise ConfigError(f"multipliers need both signs; got {list(config.multipliers)}")
    layers = parse_layers(config.layers, model.cfg.n_layers)
    encoded = encode_items(model.tokenizer, dataset)
    splits = split_by_question([item.prompt for item in dataset.items], config.fractions, config.seed)
    train = balance_letters(splits["train"], dataset)
    tr, sel, te = torch.tensor(train), torch.tensor(splits["select"]), torch.tensor(splits["test"])
    pos, neg = answer_activations(model, encoded, layers, config.read, config.component, config.batch_size)
    test_items = [encoded[i] for i in te.tolist()]
    base_p, base_mass = letter_propensity(model, test_items, batch_size=config.batch_size)
    band = chance_band((pos[tr], neg[tr]), (pos[te], neg[te]), range(len(layers)), config.n_random, config.seed)
    steered = [m for m in multipliers if m != 0]
    report_layers, vectors = {}, {}
    for j, layer in enumerate(layers):
        p_tr, n_tr = pos[tr, j], neg[tr, j]
        unit = get_method(config.method).extract(p_tr, n_tr)["vector"]
        vector = unit * ((p_tr.mean(0) - n_tr.mean(0)) @ unit)
        vectors[layer] = vector
        threshold = float(((p_tr @ unit).mean() + (n_tr @ unit).mean()) / 2)
        detection = {name: {k: e.to_dict() for k, e in paired_separation(
            pos[idx, j] @ unit, neg[idx, j] @ unit, threshold, seed=config.seed).items()}
            for name, idx in (("select", sel), ("test", te))}
        control = random_control(vector, derived_seed(CONTROL_STREAM, config.seed, layer))
        curves = {}
        for name, v in (("curve", vector), ("control", control)):
            p, mass = letter_propensity(model, test_items, [v] * len(steered), layer, steered, config.component,
                                        config.batch_size)
            k0 = multipliers.index(0.0)
            curves[name] = (torch.cat([p[:k0], base_p, p[k0:]]), torch.cat([mass[:k0], base_mass, mass[k0:]]))
        report_layers[str(layer)] = {
            "detection": detection, "chance": band[str(j)], "scale": round(float(vector.norm()), 4),
            **{name: [{"multiplier": m, "p_match": bootstrap_mean(p[k], seed=config.seed).to_dict(),
                       "mass": bootstrap_mean(mass[k], seed=config.seed).to_dict()}
                      for k, m in enumerate(multipliers)] for name, (p, mass) in curves.items()},
            "effect": bootstrap_mean(curves["curve"][0][-1] - curves["curve"][0][0], seed=config.seed).to_dict(),
            "control_effect": bootstrap_mean(curves["control"][0][-1] - curves["control"][0][0],
                                             seed=config.seed).to_dict(),
            "steerable": round(float((curves["curve"][0][-1] > curves["curve"][0][0]).double().mean()), 4),
        }
    best = max(layers, key=lambda l: report_layers[str(l)]["detection"]["select"]["auroc"]["value"])
    report = {
        "model": model_id, **data_source(dataset), "n_questions": len(dataset),
        "letter_balance": dataset.letter_balance(),
        "splits": {s: len(ix) for s, ix in splits.items()},
        "train_letters": dict(sorted(Counter(dataset.items[i].matching for i in train).items())),
        "method": config.method, "read": config.read,
        "component": config.component, "multipliers": multipliers, "seed": config.seed,
        "n_random": config.n_random,
        "unsteered": {"p_match": bootstrap_mean(base_p[0], seed=config.seed).to_dict(),
                      "mass": bootstrap_mean(base_mass[0], seed=config.seed).to_dict()},
        "layers": report_layers, "selected": {"layer": best, "by": "select auroc"},
    }
    return ABResult(report, vectors)


# --- files -----------------------------------------------------------------------------------------


def save_ab(result: ABResult, out: str | Path, command: str | None = None) -> list[Path]:
    """Write ``report.json`` (the report and ``command``, default "python API (save_ab)"), ``vectors.safetensors``
    (``{str(layer): steering vector}``), ``propensity.svg`` and ``propensity.md`` (opening with the command, version
    and commit, then the result stated from the numbers) into the folder ``out`` (created; each file atomically);
    returns their paths."""
    from tracelens.pipeline.ab_plot import propensity_markdown, propensity_svg

    out = Path(out)
    report = {**result.report, "command": command or "python API (save_ab)"}
    paths = [out / "report.json", out / "vectors.safetensors", out / "propensity.svg", out / "propensity.md"]
    write_json(paths[0], report)
    save_tensors(paths[1], {str(l): v for l, v in result.vectors.items()})
    write_bytes(paths[2], propensity_svg(report).encode())
    write_bytes(paths[3], propensity_markdown(report).encode())
    return paths
