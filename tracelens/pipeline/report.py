"""A Markdown report of an experiment, rendered from its stored artifacts only.

``render_report("my_exp")`` reads, per trait, the extraction evaluation files
(``evaluation/{position}/{component}.json``), the activations' split metadata and every steering
``results.jsonl``, and returns Markdown: the setup, test AUROC / accuracy by layer with 95% intervals beside
the random-direction chance band, the selected vector and how it was chosen, every steering search run
beside its random control, the selected run on the report questions, examples, and caveats derived from the
numbers. Nothing is typed in by hand and nothing is recomputed: the same files (and the same command, version
and commit in its opening lines, see `tracelens.provenance`) give the same bytes. ``write_report`` writes it
atomically.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from tracelens.errors import MissingArtifactError
from tracelens.store import Experiment, get_model_variant
from tracelens.io import write_bytes
from tracelens.metrics import Estimate
from tracelens.provenance import provenance_lines
from tracelens.types import ALWAYS_EVALUATED, Evaluation, EvaluationRow, SteeringResults, SteeringRunRecord

MAX_ANSWER_CHARS = 200  # example answers are cut here (before escaping)
SMALL_N = 10  # fewer questions than this: percentile-bootstrap intervals run narrow; said in the caveats

HOW_TO_READ = """\
## How to read this report

- **AUROC** (0-1): the probability that a positive answer projects higher on the vector than a negative \
one; 0.5 is chance. **Accuracy** (0-1) is balanced accuracy at the threshold fitted on the train split. \
Both are measured on the *test* split, which neither fitting nor selection saw; intervals are 95% \
bootstrap intervals over test questions (a question's two answers are resampled together).
- **Chance band**: the 5th-95th percentile of the same metric over random unit directions at that layer. \
A row is *above chance* when the lower end of its test AUROC interval is above the band's 95th percentile.
- **Selection** uses the *select* split only; the test numbers of the selected row are the honest estimate.
- **Judge scores** (0-100) are the steering judge's trait and coherence ratings; for the offline \
classifier judge the trait score is 100 x P(trait | answer), not a calibrated rating. Search-run scores \
are on the search questions the run was selected on, so the best one overstates; the report line \
re-judges it on disjoint report questions.
- **Trait effect** (nats/token): the change under steering of the per-token log-likelihood ratio \
log p(positive answer) - log p(negative answer), averaged over the extraction's test pairs (teacher \
forcing, no judge). **NLL cost** (nats/token): the change in per-token negative log-likelihood of the \
unsteered model's own answers to neutral prompts. **KL** (nats/token): KL(unsteered || steered) of the \
next-token distributions on those answers.
- **Control**: a random direction with the same norm and coefficient; an effect that the control matches \
is not specific to the trait direction.
"""


def render_report(experiment: str | Experiment, traits: Sequence[str] | None = None,
                  variant: str | None = None, *, command: str | None = None) -> str:
    """Markdown report of ``traits`` (None: every trait with an extraction evaluation or steering results).

    ``variant`` is the model variant (default: the experiment's extraction default for the extraction
    part, its application default for steering). The report opens with ``command`` (default:
    "python API (render_report)"), the tracelens version and the git commit.
    Raises FileNotFoundError when the experiment has no config, or when a trait (or the whole experiment) has
    neither an evaluation nor steering results.
    """
    exp = Experiment.of(experiment)
    ex_variant = get_model_variant(exp, variant, mode="extraction").name
    st_variant = get_model_variant(exp, variant, mode="application").name
    if traits is None:
        traits = _traits_with_results(exp, ex_variant, st_variant)
        if not traits:
            raise MissingArtifactError(
                f"experiment {exp.name!r} has no extraction evaluation ({ex_variant}) and no steering results "
                f"({st_variant}) under {exp.dir}; run `tracelens extract` (and steering) first")
    command = command or "python API (render_report)"
    out = [*provenance_lines(command), "", f"# Experiment report: {exp.name}", "", HOW_TO_READ]
    for trait in traits:
        evaluations = exp.evaluations(trait, ex_variant)
        steering = exp.all_steering_results(trait, st_variant)
        if not evaluations and not steering:
            raise MissingArtifactError(f"no extraction evaluation or steering results for {trait!r} in experiment "
                                    f"{exp.name!r} ({exp.extraction_dir(trait, ex_variant)}); run extraction first")
        out += [f"## {trait}", ""]
        for ev in evaluations:
            out += _extraction_section(exp, trait, ex_variant, ev)
        for position_dir, results in steering.items():
            out += _steering_section(position_dir, results)
    return "\n".join(out).rstrip("\n") + "\n"


def write_report(experiment: str | Experiment, traits: Sequence[str] | None, path: str | Path,
                 variant: str | None = None, *, command: str | None = None) -> Path:
    """Write ``render_report(experiment, traits, variant, command=...)`` to ``path`` atomically (UTF-8); returns
    the path. ``command`` (the CLI passes its command line; default "python API (write_report)") is what the
    report's first line says produced it."""
    path = Path(path)
    command = command or "python API (write_report)"
    write_bytes(path, render_report(experiment, traits, variant, command=command).encode())
    return path


JUDGE_FREE = (("trait_effect", "trait effect"), ("nll_cost", "NLL cost"), ("kl", "KL"))  # key, name; nats/token


def reported_run(results: SteeringResults) -> SteeringRunRecord | None:
    """The search run whose configuration the report line re-judged on the report questions (the selected
    run); None when there is no report line or no stored run matches it."""
    if results.report is None:
        return None
    return next((r for r in results.runs if r.config.to_dict() == results.report["config"]), None)


def judge_free_comparison(run: SteeringRunRecord) -> list[tuple[str, dict | None, dict | None, bool | None]]:
    """Per judge-free metric of ``run`` (`JUDGE_FREE`): its name, the run's stored ``{"value", "lo", "hi"}``, the
    random control's, and whether the two intervals overlap (None when either is missing)."""
    out = []
    for key, name in JUDGE_FREE:
        est, ctl = (run.judge_free or {}).get(key), (run.control or {}).get(key)
        out.append((name, est, ctl, None if est is None or ctl is None else intervals_overlap(est, ctl)))
    return out


def _traits_with_results(exp: Experiment, ex_variant: str, st_variant: str) -> list[str]:
    """Names of every trait with an evaluation file or a steering results file, sorted."""
    return sorted({*exp.traits("evaluation", ex_variant), *exp.traits("steering_results", st_variant)})


# --- formatting -------------------------------------------------------------------------------------------


def _num(x: float | None, spec: str = ".4f") -> str:
    return "n/a" if x is None else format(x, spec)


def fmt_ci(d: Mapping[str, float] | None, spec: str = ".4f") -> str:
    """A stored ``{"value", "lo", "hi"}`` as ``value [lo, hi]`` ("n/a" for None)."""
    return "n/a" if d is None else format(Estimate.from_dict(d), spec)


def _coef(x: float) -> str:
    """A steering coefficient as stored (rounded to 4 decimals)."""
    return repr(round(x, 4))


def _has_zero(d: Mapping[str, float]) -> bool:
    return d["lo"] <= 0 <= d["hi"]


def intervals_overlap(a: Mapping[str, float], b: Mapping[str, float]) -> bool:
    """Whether two stored ``{"value", "lo", "hi"}`` intervals share a point."""
    return a["lo"] <= b["hi"] and b["lo"] <= a["hi"]


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(r) + " |" for r in rows] + [""]


_MD_SPECIAL = "\\`*_[]<>|#~&!"


def _md(text: str, limit: int | None = None) -> str:
    """``text`` on one line with Markdown/HTML punctuation escaped, cut to ``limit`` characters first."""
    text = " ".join(str(text).split())
    if limit is not None and len(text) > limit:
        text = text[:limit].rstrip() + "…"
    return "".join("\\" + c if c in _MD_SPECIAL else c for c in text)


def _caveats(items: list[str]) -> list[str]:
    return ["**Caveats (from the numbers above):**", "", *[f"- {c}" for c in items], ""] if items else []


# --- extraction -------------------------------------------------------------------------------------------


def _split_questions(exp: Experiment, trait: str, variant: str, position: str, component: str) -> dict | None:
    """Distinct questions per split from the activations metadata and responses; None if either is gone."""
    try:
        splits = exp.activation_metadata(trait, variant, position, component).splits
        prompts = [r.prompt for r in exp.responses(trait, variant)[0]]
    except MissingArtifactError:
        return None
    return {s: len({prompts[i] for i in idx}) for s, idx in splits.items()}


def _extraction_section(exp: Experiment, trait: str, variant: str, ev: Evaluation) -> list[str]:
    position, component, rows = ev.position, ev.component, ev.results
    chance, selected = ev.chance, ev.selected
    band = chance["layers"]
    pct = "-".join(f"{p:g}" for p in chance["percentiles"])
    methods = sorted({r.method for r in rows}, key=lambda m: (m == ALWAYS_EVALUATED, m))
    layers = sorted({r.layer for r in rows})
    candidates = [m for m in methods if m != ALWAYS_EVALUATED] or methods
    try:
        model = exp.responses_metadata(trait, variant).model
    except MissingArtifactError:
        model = None
    questions = _split_questions(exp, trait, variant, position, component)
    splits = ", ".join(f"{s} {n} pairs" + (f" / {questions[s]} questions" if questions else "")
                       for s, n in ev.splits.items())
    boot = ev.bootstrap or {}
    out = [f"### Extraction: position `{position}`, component `{component}`", "",
           f"- Model: `{model or 'not recorded'}` (variant `{variant}`)",
           f"- Splits (by question): {splits}",
           f"- Methods: {', '.join(f'`{m}`' for m in methods)} (`{ALWAYS_EVALUATED}` is a control, never selected)",
           f"- Bootstrap: {boot.get('n_resamples', 'n/a')} resamples of test questions; chance band: "
           f"{chance['n_directions']} random directions per layer, {pct}th percentile", ""]
    for method in methods:
        table = []
        for r in sorted((r for r in rows if r.method == method), key=lambda r: r.layer):
            layer, test, b = r.layer, r.test, band[str(r.layer)]
            is_sel = method == selected["method"] and layer == int(selected["layer"])
            table.append([str(layer), fmt_ci(test["auroc"]), fmt_ci(test["accuracy"]),
                          f"[{b['auroc']['lo']:.4f}, {b['auroc']['hi']:.4f}]",
                          f"[{b['accuracy']['lo']:.4f}, {b['accuracy']['hi']:.4f}]",
                          _num(r.select["auroc"]), "yes" if r.above_chance else "no",
                          "selected" if is_sel else ""])
        out += [f"**`{method}`** (test split)", ""]
        out += _table(["layer", "test AUROC [95% CI]", "test accuracy [95% CI]", f"chance AUROC ({pct} pct)",
                       f"chance accuracy ({pct} pct)", "select AUROC", "above chance", ""], table)
    sel = ev.selected_row
    sb = band[str(sel.layer)]
    out += [f"**Selected:** `{sel.method}` at layer {sel.layer}, chosen by {selected['by']} on the select "
            f"split ({ev.splits['select']} pairs) among {len(layers)} layers x {len(candidates)} "
            f"method{'s' if len(candidates) > 1 else ''} ({len(layers) * len(candidates)} candidates). "
            f"Its test AUROC is {fmt_ci(sel.test['auroc'])} against a chance band of "
            f"[{sb['auroc']['lo']:.4f}, {sb['auroc']['hi']:.4f}]; test accuracy {fmt_ci(sel.test['accuracy'])}; "
            f"Cohen's d {fmt_ci(sel.test['effect_size'], '.2f')}.", ""]
    return out + _caveats(_extraction_caveats(ev, sel, sb))


def _extraction_caveats(ev: Evaluation, sel: EvaluationRow, sb: dict) -> list[str]:
    rows, items = ev.results, []
    if not sel.above_chance:
        items.append(f"The selected vector's test AUROC interval ({fmt_ci(sel.test['auroc'])}) does not clear the "
                     f"chance band's top ({sb['auroc']['hi']:.4f}): it is not distinguishable from a random direction.")
    if sel.above_chance and sel.test["accuracy"]["value"] <= sb["accuracy"]["hi"]:
        items.append(f"The selected vector ranks answers above chance but its test accuracy "
                     f"({sel.test['accuracy']['value']:.4f}) is within the chance band: the threshold fitted on "
                     "train does not transfer to the test split.")
    controls = [r for r in rows if r.method == ALWAYS_EVALUATED and r.above_chance]
    if controls:
        items.append(f"`{ALWAYS_EVALUATED}` is above chance at {len(controls)} layer(s) "
                     f"({', '.join(str(r.layer) for r in controls)}): the band or the split may be too small "
                     "to tell real directions from random ones.")
    real = [r for r in rows if r.method != ALWAYS_EVALUATED]
    items.append(f"{sum(r.above_chance for r in real)} of {len(real)} fitted method x layer rows are above chance.")
    if ev.splits["test"] < SMALL_N:
        items.append(f"The test split has {ev.splits['test']} pairs: intervals from so few questions run "
                     "narrow and the estimates are noisy.")
    return items


# --- steering ---------------------------------------------------------------------------------------------


def _steering_section(position_dir: str, res: SteeringResults) -> list[str]:
    h = res.header
    judge = h.eval or {}
    validity = judge.get("validity")
    valid_text = ("not measured" if validity is None else
                  f"AUROC {fmt_ci(validity['auroc'])} on {validity['n_pairs']} pairs ({_md(validity['data'])})")
    src = h.vector_source or {}
    out = [f"### Steering: `{position_dir}`, direction {h.direction}", "",
           f"- Steered model: `{h.steering_model}`; vectors: `{src.get('method')}` / `{src.get('component')}` "
           f"(input hash `{src.get('input_hash')}`)",
           f"- Judge: `{judge.get('model')}` ({judge.get('method')}); validity: {valid_text}",
           f"- {h.n_questions} search questions, {h.n_report} report questions, {h.max_new_tokens} new tokens, "
           f"{h.n_neutral} neutral prompts for the NLL cost", ""]
    if res.baseline is not None:
        jf = res.baseline_judge_free or {}
        out += [f"**Baseline (unsteered):** judge trait {_num(res.baseline.trait_mean, '.1f')}, coherence "
                f"{_num(res.baseline.coherence_mean, '.1f')} on {res.baseline.n} search answers; log-likelihood "
                f"ratio {fmt_ci(jf.get('llr'))} nats/token on the test pairs; NLL {fmt_ci(jf.get('nll'))} "
                "nats/token on the neutral answers.", ""]
    report = res.report
    selected = report["config"] if report else None
    rows = []
    for run in sorted(res.runs, key=lambda r: (r.method, r.layer, r.coefficient)):
        jf, ctl = run.judge_free or {}, run.control or {}
        rows.append([str(run.layer), _coef(run.coefficient), _num(run.result.trait_mean, ".1f"),
                     _num(run.result.coherence_mean, ".1f"), fmt_ci(jf.get("trait_effect")), fmt_ci(jf.get("nll_cost")),
                     fmt_ci(jf.get("kl")), fmt_ci(ctl.get("trait_effect")), fmt_ci(ctl.get("nll_cost")),
                     "selected" if run.config.to_dict() == selected else ""])
    out += [f"**Search runs** ({len(res.runs)}; judge scores on the search questions)", ""]
    out += _table(["layer", "coefficient", "judge trait", "judge coherence", "trait effect", "NLL cost", "KL",
                   "control trait effect", "control NLL cost", ""], rows)
    if report is None:
        return out + _caveats(["No run was re-judged on report questions (no run reached the coherence "
                               "threshold, or the search stopped early): every judged number above comes from "
                               "the questions the search was tuned on."] + _judge_caveats(validity))
    return (out + _report_part(report, judge, valid_text) + _judge_free_part(reported_run(res))
            + _caveats(_steering_caveats(report, res, validity)))


_CONDITIONS = ("unsteered", "steered", "control")


def _report_part(report: dict, judge: dict, valid_text: str) -> list[str]:
    v = report["config"]["vectors"][0]
    rows = [[c, fmt_ci(report["trait"].get(c), ".1f"), fmt_ci(report["coherence"].get(c), ".1f"),
             fmt_ci(report["trait_delta"].get(c), ".1f") if c != "unsteered" else "",
             fmt_ci(report["coherence_delta"].get(c), ".1f") if c != "unsteered" else ""] for c in _CONDITIONS]
    out = [f"**Report** (the selected run, `{v['method']}` at layer {v['layer']}, coefficient {_coef(v['weight'])}, "
           f"re-judged by `{judge.get('model')}` (validity: {valid_text}) on {report['n_questions']} report "
           "questions unseen by the search; deltas are per-question differences from unsteered, 95% bootstrap "
           "intervals)", ""]
    out += _table(["condition", "judge trait", "judge coherence", "trait delta", "coherence delta"], rows)
    examples = report.get("examples") or []
    if examples:
        out += [f"**Examples** (first {len(examples)}; answers cut at {MAX_ANSWER_CHARS} characters)", ""]
        for ex in examples:
            out.append(f"- Q: {_md(ex['question'], MAX_ANSWER_CHARS)}")
            out += [f"  - {c}: {_md(ex[c], MAX_ANSWER_CHARS)}" for c in _CONDITIONS if c in ex]
        out.append("")
    return out


def _judge_free_part(run: SteeringRunRecord | None) -> list[str]:
    """The selected run's judge-free metrics beside its random control's, from its search-run line."""
    if run is None:
        return []
    rows = [[name, fmt_ci(est), fmt_ci(ctl), {None: "n/a", True: "overlap", False: "apart"}[overlap]]
            for name, est, ctl, overlap in judge_free_comparison(run)]
    out = ["**Judge-free, the selected run** (nats/token, 95% bootstrap intervals; trait effect on the "
           "extraction's test pairs, NLL cost and KL on the neutral answers; the control is a random direction "
           "of the same norm and coefficient)", ""]
    return out + _table(["metric", "steered", "random control", "intervals"], rows)


def _judge_caveats(validity: dict | None) -> list[str]:
    if validity is None:
        return ["The judge's validity was not measured: its trait scores are not validated for this trait."]
    if validity["auroc"]["lo"] <= 0.5:
        return [f"The judge's validity AUROC interval ({fmt_ci(validity['auroc'])}) reaches 0.5: it does not "
                "reliably tell positive from negative answers, so its trait scores say little."]
    return []


def _steering_caveats(report: dict, res: SteeringResults, validity: dict | None) -> list[str]:
    items = []
    steered, control = report["trait_delta"].get("steered"), report["trait_delta"].get("control")
    sign = 1 if res.header.direction == "positive" else -1
    if steered is not None:
        if _has_zero(steered):
            items.append(f"The steered trait delta on report questions ({fmt_ci(steered, '.1f')}) includes 0: the "
                         "judge cannot tell the steered answers from unsteered ones.")
        elif sign * steered["value"] < 0:
            items.append(f"The steered trait delta ({fmt_ci(steered, '.1f')}) goes against the intended "
                         f"{res.header.direction} direction.")
        if control is not None and intervals_overlap(steered, control):
            items.append(f"The steered trait delta ({fmt_ci(steered, '.1f')}) overlaps the random control's "
                         f"({fmt_ci(control, '.1f')}): not distinguishable from steering with a random direction.")
    run = reported_run(res)
    effect = (run.judge_free or {}).get("trait_effect") if run else None
    ctl = (run.control or {}).get("trait_effect") if run else None
    if effect is not None and _has_zero(effect):
        items.append(f"The selected run's judge-free trait effect ({fmt_ci(effect)} nats/token) includes 0.")
    if effect is not None and ctl is not None and intervals_overlap(effect, ctl):
        items.append(f"The selected run's judge-free trait effect ({fmt_ci(effect)}) overlaps its random control's "
                     f"({fmt_ci(ctl)}).")
    if report["n_questions"] < SMALL_N:
        items.append(f"The report rests on {report['n_questions']} questions: intervals from so few questions run "
                     "narrow and the estimates are noisy.")
    return items + _judge_caveats(validity)
