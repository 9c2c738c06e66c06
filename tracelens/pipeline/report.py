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
from tracelens.provenance import _code, provenance_lines
from tracelens.pipeline.tradeoff_plot import tradeoff_svg
from tracelens.types import (ALWAYS_EVALUATED, JUDGE_COHERENCE, Evaluation, EvaluationRow, SteeringResults,
                             SteeringRunRecord)

MAX_ANSWER_CHARS = 200  # example answers are cut here (before escaping)
SMALL_N = 30  # fewer questions than this: percentile-bootstrap intervals undercover (run narrow); said in caveats

HOW_TO_READ = """\
## How to read this report

- **AUROC** (0-1): the probability that a positive answer projects higher on the vector than a negative \
one; 0.5 is chance. **Accuracy** (0-1) is balanced accuracy at the threshold fitted on the train split. \
Both are measured on the *test* split, which neither fitting nor selection saw; intervals are 95% \
bootstrap intervals over test questions (a question's two answers are resampled together).
- **Chance band**: the 5th-95th percentile of the same metric over random unit directions at that layer. \
A row is *above chance* when the lower end of its test AUROC interval is above the band's 95th percentile. \
The band is not corrected for the number of rows tested against it: with N fitted method x layer rows, about \
N x 0.05 of them would clear a per-layer 95th percentile by chance alone; the caveats give both counts.
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
- **KL budget**: the selected run is the one with the highest judge trait score among runs whose KL stays \
within the budget (and whose judge coherence reaches the threshold); runs over it are listed, never selected.
- **Prompted**: the unsteered model given the trait's own instruction (the extraction's system prompts) as \
its system prompt: what simply asking for the trait achieves, judged and scored the same way.
- **Controls**: random directions with the vector's norm and coefficient (their own seed), question q \
under direction q mod N in the judged rows; their judge-free numbers are a band over directions, at matched \
norm and, interpolated along their curve, at matched KL. An effect the controls match is not specific to the \
trait direction.
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
    report's first line says produced it. The trade-off figures it links to are written beside it
    (`report_figures`)."""
    path = Path(path)
    command = command or "python API (write_report)"
    text = render_report(experiment, traits, variant, command=command)
    for name, svg in report_figures(experiment, traits, variant).items():
        write_bytes(path.parent / name, svg.encode())
    write_bytes(path, text.encode())
    return path


JUDGE_FREE = (("trait_effect", "trait effect"), ("nll_cost", "NLL cost"), ("kl", "KL"))  # key, name; nats/token
SIGNAL_NAMES = {JUDGE_COHERENCE: "judge coherence", "degeneracy": "degeneracy guard",
                "nll": "NLL under the unsteered model"}  # the coherence validation's signals


def reported_run(results: SteeringResults) -> SteeringRunRecord | None:
    """The search run whose configuration the report line re-judged on the report questions (the selected
    run); None when there is no report line or no stored run matches it."""
    if results.report is None:
        return None
    return next((r for r in results.runs if r.config.to_dict() == results.report["config"]), None)


def judge_free_comparison(results: SteeringResults) -> list[tuple[str, dict | None, dict | None, bool | None]]:
    """Per judge-free metric (`JUDGE_FREE`) of the reported run: its name, the run's stored ``{"value", "lo",
    "hi"}``, the random controls' band (mean, 5-95% over directions) at the same norm and coefficient, and
    whether the two share a point (None when either is missing); empty without a report line."""
    if results.report is None:
        return []
    jf = results.report.get("judge_free") or {}
    steered, control = jf.get("steered") or {}, jf.get("control") or {}
    out = []
    for key, name in JUDGE_FREE:
        est, ctl = steered.get(key), control.get(key)
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
    """A steering coefficient as stored (6 significant digits)."""
    return format(x, ".6g")


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
    n_real, by_chance = _chance_comparisons(ev)
    out = [f"### Extraction: position `{position}`, component `{component}`", "",
           f"- Produced by: {_code(ev.command) if ev.command else 'not recorded'}",
           f"- Model: `{model or 'not recorded'}` (variant `{variant}`)",
           f"- Splits (by question): {splits}",
           f"- Methods: {', '.join(f'`{m}`' for m in methods)} (`{ALWAYS_EVALUATED}` is a control, never selected)",
           f"- Bootstrap: {boot.get('n_resamples', 'n/a')} resamples of test questions; chance band: "
           f"{chance['n_directions']} random directions per layer, {pct}th percentile, against which "
           f"{n_real} fitted method x layer rows are tested (about {by_chance:g} would clear a per-layer "
           f"{chance['percentiles'][-1]:g}th percentile by chance alone)", ""]
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
    n_real, by_chance = _chance_comparisons(ev)
    top = ev.chance["percentiles"][-1]
    items.append(f"{sum(r.above_chance for r in real)} of {n_real} fitted method x layer rows are above chance; "
                 f"by chance alone about {n_real} x {(100 - top) / 100:g} = {by_chance:g} would clear a per-layer "
                 f"{top:g}th percentile (the band is not corrected for the {n_real} comparisons).")
    if ev.splits["test"] < SMALL_N:
        items.append(f"The test split has {ev.splits['test']} pairs (fewer than {SMALL_N}): percentile-bootstrap "
                     "intervals from so few questions run narrow and the estimates are noisy.")
    return items


def _chance_comparisons(ev: Evaluation) -> tuple[int, float]:
    """The fitted (non-control) method x layer rows tested against the chance band, and how many of them
    would clear its per-layer top percentile by chance alone (rows x its tail fraction, e.g. 0.05)."""
    n = sum(r.method != ALWAYS_EVALUATED for r in ev.results)
    return n, round(n * (100 - ev.chance["percentiles"][-1]) / 100, 2)


# --- steering ---------------------------------------------------------------------------------------------

ROW_NAMES = {"unsteered": "unsteered", "prompted": "prompted (the trait's instruction)", "steered": "steered",
             "prompted_steered": "prompted + steered", "control": "random control"}


def tradeoff_figure_name(trait: str, position_dir: str) -> str:
    """The file name of a steering section's trade-off SVG, beside the report."""
    return f"tradeoff-{trait.replace('/', '-')}-{position_dir}.svg"


def report_figures(experiment: str | Experiment, traits: Sequence[str] | None = None,
                   variant: str | None = None) -> dict[str, str]:
    """``{file name: SVG text}`` of the trade-off figures that ``render_report`` links to."""
    exp = Experiment.of(experiment)
    st_variant = get_model_variant(exp, variant, mode="application").name
    traits = traits if traits is not None else sorted(exp.traits("steering_results", st_variant))
    out = {}
    for trait in traits:
        for position_dir, results in exp.all_steering_results(trait, st_variant).items():
            svg = tradeoff_svg(results)
            if svg is not None:
                out[tradeoff_figure_name(trait, position_dir)] = svg
    return out


def _steering_section(position_dir: str, res: SteeringResults) -> list[str]:
    h = res.header
    judge = h.eval or {}
    validity = judge.get("validity")
    valid_text = ("not measured" if validity is None else
                  f"AUROC {fmt_ci(validity['auroc'])} on {validity['n_pairs']} pairs ({_md(validity['data'])})")
    src, sel = h.vector_source or {}, h.selection or {}
    out = [f"### Steering: `{position_dir}`, direction {h.direction}", "",
           f"- Produced by: {_command(h.command)}",
           f"- Steered model: `{h.steering_model}`; vectors: `{src.get('method')}` / `{src.get('component')}` "
           f"(input hash `{src.get('input_hash')}`)",
           f"- Judge: `{judge.get('model')}` ({judge.get('method')}); validity: {valid_text}",
           f"- {h.n_questions} search questions, {h.n_report} report questions, {h.max_new_tokens} new tokens, "
           f"{h.n_neutral} neutral prompts for the NLL cost and KL",
           f"- Selection: {_rule(res)}", *[f"- {line}" for line in coherence_lines(res)], ""]
    if res.baseline is not None:
        jf = res.baseline_judge_free or {}
        out += [f"**Baseline (unsteered):** judge trait {_num(res.baseline.trait_mean, '.1f')}, coherence "
                f"{_num(res.baseline.coherence_mean, '.1f')} on {res.baseline.n} search answers; log-likelihood "
                f"ratio {fmt_ci(jf.get('llr'))} nats/token on the test pairs; NLL {fmt_ci(jf.get('nll'))} "
                "nats/token on the neutral answers.", ""]
    out += _search_table(res, sel.get("max_kl"))
    if res.report is None:
        return out + _caveats(["No run was re-judged on report questions (no run is within the KL budget with "
                               "enough coherence): every judged number above comes from the questions the search "
                               "was tuned on."] + _judge_caveats(validity))
    figure = tradeoff_figure_name(h.trait, position_dir)
    out += [f"![Trait against KL for the searched layers, with random controls and the budget]({figure})", "",
            f"*Figure `{figure}`: trait effect and judge trait score against KL per searched layer; grey: random "
            "controls at their mean KL (trait effect: mean and 5-95% band over directions; judge trait: on the "
            "search questions, one direction per question, with its interval); dashed red: the KL budget.*", ""]
    return (out + _report_part(res, judge, valid_text) + _examples(res.report)
            + _caveats(_steering_caveats(res.report, res, validity)))


def _command(command: str | None) -> str:
    return "not recorded" if command is None else f"`{_md(command)}`"


def _rule(res: SteeringResults) -> str:
    sel = res.header.selection
    if not sel:
        return "not recorded (results written before the KL budget: the best run by judge coherence alone)"
    grid, min_coherence = sel.get("grid") or {}, res.selection_rule()[0]
    coherence = "" if min_coherence is None else f" and judge coherence >= {min_coherence:g}"
    return (f"the run with the highest judge trait score in the trait's direction among runs with KL <= "
            f"{sel['max_kl']:g} nats/token{coherence}; grid of {grid.get('n')} "
            f"coefficients per layer log-spaced from {grid.get('low'):g} to {grid.get('high'):g} x mean ||h|| / ||v|| "
            f"(0 is the baseline); {sel['n_controls']} random control directions (seed {sel['control_seed']})")


def coherence_lines(res: SteeringResults) -> list[str]:
    """The header's coherence validation in two sentences: each signal's AUROC (intact against damaged answers
    of held-out questions) and whether selection uses the judge's coherence."""
    v = res.header.coherence_validity
    if not v:
        return ["Coherence validity: not measured (results written before the coherence validation); the judge's "
                "coherence is not used in selection."]
    n, q = v["n_items"]["held_out"], v["n_questions"]["held_out"]
    aurocs = "; ".join(f"{SIGNAL_NAMES.get(k, k)} {fmt_ci(e, '.3f')}" for k, e in v["auroc"].items())
    min_coherence = res.selection_rule()[0]
    use = (f"the judge's coherence is shown valid (interval above 0.5), so selection requires it >= "
           f"{min_coherence:g}." if min_coherence is not None else
           "the judge's coherence is not shown valid (its interval reaches 0.5), so selection does not use it: "
           "the KL budget alone limits the damage.")
    return [f"Coherence validity (AUROC of intact against damaged answers, {n['items']} answers of {q} held-out "
            f"`{v['prompt_set']}` questions, {n['intact']} intact; 0.5 is chance): {aurocs}.", f"In selection: {use}"]


def _search_table(res: SteeringResults, max_kl: float | None) -> list[str]:
    selected = res.report["config"] if res.report else None
    rows = []
    for run in sorted(res.runs, key=lambda r: (r.method, r.layer, abs(r.coefficient))):
        jf = run.judge_free or {}
        budget = "" if max_kl is None else ("yes" if run.within_budget(max_kl) else "**over**")
        rows.append([str(run.layer), _coef(run.coefficient), _num(run.result.trait_mean, ".1f"),
                     _num(run.result.coherence_mean, ".1f"), fmt_ci(jf.get("trait_effect")), fmt_ci(jf.get("nll_cost")),
                     fmt_ci(jf.get("kl")), budget, "selected" if run.config.to_dict() == selected else ""])
    out = [f"**Search runs** ({len(res.runs)}; judge scores on the search questions; runs over the KL budget are "
           "shown, never selected)", ""]
    return out + _table(["layer", "coefficient", "judge trait", "judge coherence", "trait effect", "NLL cost", "KL",
                         "within budget", ""], rows)


def _report_part(res: SteeringResults, judge: dict, valid_text: str) -> list[str]:
    report = res.report
    v = report["config"]["vectors"][0]
    jf = report.get("judge_free") or {}
    moved = (report.get("steerability") or {}).get("moved") or {}
    rows = []
    for cond in (c for c in ROW_NAMES if c in report["results"]):
        m = jf.get(cond) or {}
        zero = {"value": 0.0, "lo": 0.0, "hi": 0.0} if cond == "unsteered" else None
        rows.append([ROW_NAMES[cond], fmt_ci(report["trait"].get(cond), ".1f"),
                     fmt_ci(report["trait_delta"].get(cond), ".1f") if cond != "unsteered" else "",
                     fmt_ci(report["coherence"].get(cond), ".1f"),
                     fmt_ci(m.get("trait_effect", zero)), fmt_ci(m.get("nll_cost", zero)),
                     fmt_ci(m.get("kl", zero)) if cond in ("unsteered", "steered", "control") else "not defined",
                     fmt_ci(moved.get(cond), ".2f") if cond != "unsteered" else ""])
    n_ctl = (res.header.selection or {}).get("n_controls", "n/a")
    out = [f"**Report** (the selected run, `{v['method']}` at layer {v['layer']}, coefficient {_coef(v['weight'])}, "
           f"re-judged by `{judge.get('model')}` (validity: {valid_text}) on {report['n_questions']} report "
           "questions unseen by the search; deltas are per-question differences from unsteered; 95% bootstrap "
           f"intervals over questions, except the control's judge-free numbers: mean and 5-95% band over {n_ctl} "
           "random directions of the vector's norm and coefficient)", ""]
    out += _table(["condition", "judge trait", "trait delta", "judge coherence", "trait effect (nats/token)",
                   "NLL cost (nats/token)", "KL (nats/token)", "questions moved the intended way"], rows)
    return out + [f"- {line}" for line in steering_verdicts(res)] + [""]


def steering_verdicts(res: SteeringResults) -> list[str]:
    """Plain sentences from the report line: steering against prompting, the budget's cost, the control at
    matched KL and the anti-steerable questions."""
    report, h = res.report, res.header
    out, sign = [], 1 if h.direction == "positive" else -1
    versus = report.get("steering_vs_prompting")
    if versus is not None:
        cost = {c: ((report.get("judge_free") or {}).get(c) or {}).get("nll_cost") for c in ("steered", "prompted")}
        verdict = ("Steering beats prompting" if versus["lo"] > 0 else "Prompting beats steering" if versus["hi"] < 0
                   else "Steering and prompting cannot be told apart")
        out.append(f"{verdict} on this model: steered minus prompted judge trait, in the trait's direction, "
                   f"{fmt_ci(versus, '.1f')} points per question, at an NLL cost of {fmt_ci(cost['steered'])} "
                   f"against {fmt_ci(cost['prompted'])} nats/token for prompting.")
    sel = report.get("selection") or {}
    if sel:
        chosen, free = sel["selected"], sel.get("unconstrained")
        if free is None:
            out.append(f"The KL budget ({sel['max_kl']:g} nats/token) cost nothing: the best run without it is the "
                       f"selected one (KL {fmt_ci(chosen['kl'])}).")
        else:
            fv = free["config"]["vectors"][0]
            out.append(f"The KL budget ({sel['max_kl']:g} nats/token) cost "
                       f"{sign * (free['trait_mean'] - chosen['trait_mean']):.1f} judge points on the search questions "
                       f"and {sign * (free['trait_effect']['value'] - chosen['trait_effect']['value']):.4f} nats/token "
                       f"of trait effect: without it the search would pick layer {fv['layer']}, coefficient "
                       f"{_coef(fv['weight'])} (judge trait {_num(free['trait_mean'], '.1f')}, KL {fmt_ci(free['kl'])}, "
                       f"trait effect {fmt_ci(free['trait_effect'])}); {sel['n_over_budget']} of {sel['n_runs']} runs "
                       "are over budget.")
    matched, steered = report.get("matched_kl"), (report.get("judge_free") or {}).get("steered") or {}
    if matched is not None and steered.get("trait_effect"):
        band = matched["trait_effect"]
        clear = sign * steered["trait_effect"]["lo"] > sign * (band["hi"] if sign > 0 else band["lo"])
        out.append(f"At matched KL ({matched['kl']:.4f} nats/token) the random directions move the trait effect by "
                   f"{band['value']:.4f} (5-95% band [{band['lo']:.4f}, {band['hi']:.4f}], {matched['n_directions']} "
                   f"of {matched['of']} directions reach that KL); steering's {fmt_ci(steered['trait_effect'])} is "
                   + ("clear of that band." if clear else "not clear of it."))
    elif matched is None and report.get("control_curve"):
        out.append("No random direction reaches the selected run's KL at the coefficients measured: no matched-KL "
                   "comparison.")
    anti = (report.get("steerability") or {}).get("anti_steerable")
    if anti is not None:
        spread = report["steerability"]["control_spread"]
        out.append(f"Anti-steerable (moved the wrong way beyond the control's 5-95% spread of deltas, "
                   f"[{spread[0]:.1f}, {spread[1]:.1f}]): " + ("none." if not anti else
                                                              "; ".join(f"\"{_md(q)}\"" for q in anti) + "."))
    return out


def _examples(report: dict) -> list[str]:
    examples = report.get("examples") or []
    if not examples:
        return []
    out = [f"**Examples** (first {len(examples)}; answers cut at {MAX_ANSWER_CHARS} characters)", ""]
    for ex in examples:
        out.append(f"- Q: {_md(ex['question'], MAX_ANSWER_CHARS)}")
        out += [f"  - {ROW_NAMES[c]}: {_md(ex[c], MAX_ANSWER_CHARS)}" for c in ROW_NAMES if c in ex]
    return out + [""]


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
    for name, est, ctl, overlap in judge_free_comparison(res):
        if name == "trait effect" and est is not None and _has_zero(est):
            items.append(f"The selected run's judge-free trait effect ({fmt_ci(est)} nats/token) includes 0.")
        if name == "trait effect" and overlap:
            items.append(f"The selected run's judge-free trait effect ({fmt_ci(est)}) overlaps the random controls' "
                         f"band ({fmt_ci(ctl)}).")
    if report["n_questions"] < SMALL_N:
        items.append(f"The report rests on {report['n_questions']} questions: intervals from so few questions run "
                     "narrow and the estimates are noisy.")
    return items + _judge_caveats(validity)
