"""The `tracelens` command line: every parser, and one plain keyword function per subcommand that calls the
library's stage functions and prints what they return. `tracelens SUBCOMMAND --help` lists every option with
its default and unit; `tests/test_cli_console.py` runs every subcommand through the installed script."""

from __future__ import annotations

import argparse
import os
import shlex
import sys


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _floats(text: str) -> list[float]:
    return [float(x) for x in _csv(text)]


def _vllm_backend(experiment: str, variant: str | None, mode: str):
    """A `VLLMBackend` for the experiment's variant; ConfigError for a LoRA variant, whose adapter the vLLM
    backend does not load (its responses would be the base model's)."""
    from tracelens.errors import ConfigError
    from tracelens.store import get_model_variant

    mv = get_model_variant(experiment, variant, mode=mode)
    if mv.lora is not None:
        raise ConfigError(f"--backend vllm needs a variant without a LoRA adapter; got {mv.name!r} with lora "
                         f"{mv.lora!r} (use --backend local, which merges the adapter)")
    from tracelens.serving.vllm_backend import VLLMBackend

    return VLLMBackend(mv.model)


def _judge(kind: str, trait: str, url: str, model: str, fluency_model=None):
    """The judge `kind` names; the offline one scores fluency under `fluency_model` when given."""
    from tracelens.judges.fluency import Fluency
    from tracelens.judges.offline import offline_judge
    from tracelens.judges.openai import OpenAIJudge

    if kind != "offline":
        return OpenAIJudge(url, model=model)
    return offline_judge(trait, fluency=None if fluency_model is None else Fluency(fluency_model))


# --- subcommands: plain keyword functions, one per parser -----------------------------------------


def demo(*, trait: str, invocation: str) -> None:
    from tracelens.model.loading import load_model
    from tracelens.pipeline.demo import DemoSettings, run_demo

    run_demo(load_model("default"), DemoSettings(trait=trait), command=invocation)


def extract(*, experiment: str, traits: str, variant: str | None, methods: str, position: str | None, layers: str,
            component: str, splits: str, max_new_tokens: int | None, limit: int | None, force: bool, backend: str,
            vet: bool, judge_url: str, judge_model: str, invocation: str) -> None:
    from tracelens.metrics import Estimate
    from tracelens.pipeline.extraction import ExtractionConfig, run_extraction

    config = ExtractionConfig(methods=_csv(methods), position=position, layers=layers, component=component,
                              splits=_floats(splits), max_new_tokens=max_new_tokens, limit=limit, force=force)
    vet_judge = _judge("openai", "", judge_url, judge_model) if vet else None
    response_backend = _vllm_backend(experiment, variant, "extraction") if backend == "vllm" else None
    evaluations = run_extraction(experiment, _csv(traits), config, variant=variant, vet_judge=vet_judge,
                                 response_backend=response_backend, command=invocation)
    for trait, evaluation in evaluations.items():
        row = evaluation.selected_row
        band = evaluation.chance["layers"][str(row.layer)]["auroc"]
        print(f"{trait}: selected {row.method} layer {row.layer} (select AUROC {row.select['auroc']:.3f}); "
              f"test AUROC {Estimate.from_dict(row.test['auroc']):.3f}, accuracy "
              f"{Estimate.from_dict(row.test['accuracy']):.3f}; random directions {band['lo']:.3f}-{band['hi']:.3f}"
              f"{'' if row.above_chance else ' (NOT above chance)'}")


def steer(*, experiment: str, traits: str, variant: str | None, layers: str, method: str, position: str,
          component: str, coefficients: str | None, n_coefficients: int, n_search: int, n_report: int | None,
          n_neutral: int, max_new_tokens: int, direction: str | None, max_kl: float, min_coherence: float,
          n_controls: int, judge: str, judge_url: str, judge_model: str, invocation: str) -> None:
    from tracelens.metrics import Estimate
    from tracelens.pipeline.report import coherence_lines, fmt_ci, steering_verdicts
    from tracelens.pipeline.steering_eval import SteeringEvalConfig, run_steering_eval
    from tracelens.serving.backends import LocalBackend

    config = SteeringEvalConfig(
        layers=layers, method=method, position=position, component=component,
        coefficients=_floats(coefficients) if coefficients else None, n_coefficients=n_coefficients,
        n_search=n_search, n_report=n_report, max_new_tokens=max_new_tokens, direction=direction, n_neutral=n_neutral,
        max_kl=max_kl, min_coherence=min_coherence, n_controls=n_controls)
    # the offline judge's coherence reads fluency under the unsteered model: load it once, steer through it
    backend = LocalBackend.from_experiment(experiment, variant) if judge == "offline" else None
    for trait in _csv(traits):
        trait_judge = _judge(judge, trait, judge_url, judge_model, backend and backend.model)
        results = run_steering_eval(experiment, trait, trait_judge, config, variant=variant, backend=backend,
                                    command=invocation)
        print(f"{trait}: judge {trait_judge.name}: validity on the unseen test-split answers AUROC "
              f"{Estimate.from_dict(results.header.eval['validity']['auroc']):.3f}")
        base = results.baseline
        print(f"{trait}: baseline (search questions) trait {base.trait_mean} coherence {base.coherence_mean}")
        for run in results.runs:
            jf = run.judge_free
            print(f"  layer {run.layer} coef {run.coefficient:.4g}: trait {run.result.trait_mean} coherence "
                  f"{run.result.coherence_mean}; trait effect {fmt_ci(jf['trait_effect'], '.3f')}, NLL cost "
                  f"{fmt_ci(jf['nll_cost'], '.3f')}, KL {fmt_ci(jf['kl'], '.3f')} nats/token"
                  + ("" if run.within_budget(config.max_kl) else " (over the KL budget)"))
        r = results.report
        for line in coherence_lines(results):
            print(f"{trait}: {line}")
        if results.selected_run() is None:
            print(f"{trait}: no run is within KL {config.max_kl:g} nats/token"
                  + (f" with coherence >= {config.min_coherence}" if results.selection_rule()[0] is not None else "")
                  + ": nothing reported")
            continue
        v = r["config"]["vectors"][0]
        print(f"{trait}: selected layer {v['layer']} coef {v['weight']:.4g}, on {r['n_questions']} report "
              f"questions: trait delta {fmt_ci(r['trait_delta']['steered'], '.1f')} vs random controls "
              f"{fmt_ci(r['trait_delta']['control'], '.1f')}")
        for line in steering_verdicts(results):
            print(f"  {line}")


def ab(*, data: str, model: str, layers: str, method: str, read: str, component: str, multipliers: str, splits: str,
       seed: int, n_random: int, batch_size: int, out: str, invocation: str) -> None:
    from tracelens.metrics import Estimate
    from tracelens.model.loading import load_model
    from tracelens.pipeline.ab import ABConfig, load_ab, run_ab, save_ab

    config = ABConfig(layers=layers, method=method, read=read, component=component, seed=seed, multipliers=_floats(multipliers),
                      fractions=_floats(splits), n_random=n_random, batch_size=batch_size)
    dataset = load_ab(data)
    result = run_ab(load_model(model), dataset, config, model_id=model)
    paths = save_ab(result, out, command=invocation)
    r = result.report
    print(f"{r['dataset']}: {r['n_questions']} questions, matching letters {r['letter_balance']}, splits {r['splits']}; "
          f"unsteered p(match) {Estimate.from_dict(r['unsteered']['p_match']):.3f}")
    for layer, e in r["layers"].items():
        print(f"  layer {layer}: test AUROC {Estimate.from_dict(e['detection']['test']['auroc']):.3f} "
              f"(random {e['chance']['auroc']['lo']:.2f}-{e['chance']['auroc']['hi']:.2f}); p(match) "
              f"{e['curve'][0]['p_match']['value']:.3f} at {r['multipliers'][0]:g} -> "
              f"{e['curve'][-1]['p_match']['value']:.3f} at {r['multipliers'][-1]:g}; effect "
              f"{Estimate.from_dict(e['effect']):.3f}, control {Estimate.from_dict(e['control_effect']):.3f}")
    print("wrote " + ", ".join(str(p) for p in paths))


def report(*, experiment: str, traits: str | None, variant: str | None, output: str, invocation: str) -> None:
    from tracelens.pipeline.report import write_report

    path = write_report(experiment, _csv(traits) if traits else None, output, variant=variant, command=invocation)
    print(f"wrote {path}")


def monitor(*, experiment: str, prompt_set: str, traits: str, variant: str | None, layers: str, max_new_tokens: int,
            one_pass: bool, backend: str) -> None:
    from tracelens.pipeline.monitoring import MonitorConfig, run_monitoring

    config = MonitorConfig(layers=layers, max_new_tokens=max_new_tokens, one_pass=one_pass)
    response_backend = _vllm_backend(experiment, variant, "application") if backend == "vllm" else None
    written = run_monitoring(experiment, prompt_set, _csv(traits), config, variant=variant,
                             response_backend=response_backend)
    print(f"wrote {written['responses']} response records and {written['projections']} projection records")


def massive(*, experiment: str, prompt_set: str, variant: str | None, per_token: bool) -> None:
    from tracelens.model.massive import candidate_dims
    from tracelens.pipeline.monitoring import run_massive

    found = run_massive(experiment, prompt_set, per_token, variant=variant)
    agg = found["aggregate"]
    print(f"{agg['tokens_seen']} tokens from {agg['n_prompts']} prompts")
    for dim in candidate_dims(found, "top5-3layers"):
        peak = max(agg["dim_magnitude_by_layer"][str(dim)])
        print(f"dim {dim}: up to {peak:.0f}x the mean |activation| of its layer")


def list_(*, experiment: list[str] | None, as_json: bool) -> None:
    import json

    from tracelens.store import experiments_root
    from tracelens.pipeline.inventory import inventory

    found = inventory(names=experiment)
    if as_json:
        print(json.dumps(found, indent=2))
    elif not found:
        print(f"no experiments under {experiments_root()} (set TRACELENS_EXPERIMENTS, or run tracelens extract)")
    for exp in [] if as_json else found:
        print("\n".join(_describe_lines(exp)))


def _describe_lines(exp: dict) -> list[str]:
    from tracelens.metrics import Estimate

    lines = [f"{exp['name']}  ({exp['dir']})"]
    for variant, v in exp["variants"].items():
        lines.append(f"  variant {variant}: model {v['model']}" + (f", lora {v['lora']}" if v["lora"] else ""))
        if not v["traits"]:
            lines.append("    no traits extracted or steered yet")
        for trait, t in v["traits"].items():
            lines.append(f"    {trait}")
            for s in t["selections"]:
                auroc = f"{Estimate.from_dict(s['test_auroc']):.3f}" if s["test_auroc"] else "n/a"
                band = s["chance_auroc"]
                lines.append(f"      selected {s['method']} layer {s['layer']} at {s['position']} {s['component']}: "
                             f"test AUROC {auroc}, random directions {band['lo']:.3f}-{band['hi']:.3f}"
                             f"{'' if s['above_chance'] else ' (NOT above chance)'}")
            for vec in t["vectors"]:
                lines.append(f"      vectors {vec['method']} at {vec['position']} {vec['component']}: "
                             f"layers {_ranges(vec['layers'])}")
            for st in t["steering"]:
                sel = st["selected"]
                head = f"      steering {st['position']} on {st['prompt_set']}: {st['n_runs']} runs; "
                if sel is None:
                    lines.append(head + "no run selected (none kept coherence)")
                    continue
                delta = sel["trait_delta"]
                lines.append(head + f"selected {sel['method']} layer {sel['layer']} coef {sel['coefficient']:.1f}; "
                             f"on {sel['n_questions']} report questions trait delta "
                             f"{Estimate.from_dict(delta['steered']):.1f} vs random control "
                             f"{Estimate.from_dict(delta['control']):.1f}")
                lines += [f"        {name} {Estimate.from_dict(m['steered']):.3f} vs control "
                          f"{Estimate.from_dict(m['control']):.3f} nats/token" for name, m in sel["judge_free"].items()]
    return lines


def _ranges(layers: list[int]) -> str:
    """`[0, 1, 2, 5]` -> `0-2,5`."""
    runs: list[list[int]] = []
    for layer in layers:
        if runs and layer == runs[-1][-1] + 1:
            runs[-1].append(layer)
        else:
            runs.append([layer])
    return ",".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else str(r[0]) for r in runs) or "none"


def dashboard(*, experiment: str, host: str, port: int, allow_remote: bool, token: str | None) -> None:
    from tracelens.app.dashboard import TOKEN_ENV, serve

    serve(experiment, host=host, port=port, allow_remote=allow_remote, token=token or os.environ.get(TOKEN_ENV) or None)


def server(*, experiment: str | None, variant: str | None, model: str | None, lora: str | None, host: str,
           port: int, token: str | None, **settings) -> None:
    from tracelens.app.server import TOKEN_ENV, serve

    serve(experiment, host=host, port=port, token=token or os.environ.get(TOKEN_ENV) or None, variant=variant,
          model=model, lora=lora, **settings)


# --- parsers --------------------------------------------------------------------------------------


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Appends '(default: X)' to an option's help unless it is required, a flag, defaults to None (its help then
    says what None means) or already names its default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (action.required or any(action.default is x for x in (None, False, argparse.SUPPRESS)) or "default" in text
                or not action.option_strings):
            return text
        return super()._get_help_string(action)


COMPONENT_HELP = ("the hook point {what} at each layer: residual, attn_contribution, mlp_contribution, attn_out, "
                  "mlp_out, k_proj, v_proj (tracelens.model.sites.COMPONENTS)")
LAYERS_HELP = "layers: all | P%%-Q%% (of depth) | A-B[:step] | ints (negative from the end), comma-separated"


def _subparser(sub, name: str, func, help: str, **kwargs) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help, description=help, formatter_class=_Help, **kwargs)
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                   help="show the traceback instead of a one-line error")
    p.set_defaults(func=func)
    return p


def _experiment_options(p: argparse.ArgumentParser, traits: bool = True) -> None:
    p.add_argument("--experiment", required=True, help="experiment name: a folder under $TRACELENS_EXPERIMENTS "
                                                      "(default ./experiments)")
    if traits:
        p.add_argument("--traits", required=True, help="category/trait[,category/trait...], e.g. starter/optimism")
    p.add_argument("--variant", default=None, help="model variant of the experiment's config (default: the "
                                                   "config's default for this stage)")


def _judge_options(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--judge-url", default="https://api.openai.com/v1",
                   help=f"OpenAI-compatible chat-completions base URL {what}; the key is $OPENAI_API_KEY")
    p.add_argument("--judge-model", default="gpt-4.1-mini", help=f"judge model name {what}")


def _add_extract(sub) -> None:
    p = _subparser(sub, "extract", extract, "generate contrastive responses, capture activations, fit and "
                                             "evaluate vectors on held-out questions")
    _experiment_options(p)
    p.add_argument("--methods", default="probe,mean_diff,gradient",
                   help="comma-separated: probe, mean_diff, gradient, fisher, rfm (random_baseline always runs)")
    p.add_argument("--position", default=None,
                   help="token positions to average, e.g. 'response[:]' (default: response[:] for chat models, "
                        "response[:5] for base models)")
    p.add_argument("--layers", default="all", help=LAYERS_HELP)
    p.add_argument("--component", default="residual", help=COMPONENT_HELP.format(what="captured"))
    p.add_argument("--splits", default="0.6,0.2,0.2",
                   help="train,select,test fractions of the questions (the answers of a question stay together)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="tokens generated per answer (default: 64 for chat models, 16 for base models)")
    p.add_argument("--limit", type=int, default=None,
                   help="use only each trait's first N question pairs, for a quick run (default: all)")
    p.add_argument("--force", action="store_true", help="recompute every stage, even the ones stored")
    p.add_argument("--backend", choices=["local", "vllm"], default="local",
                   help="what generates the responses (vllm: bulk generation on GPUs; capture stays local)")
    p.add_argument("--vet", action="store_true",
                   help="keep only the pairs an LLM judge scores pos >= 60, neg <= 40 (of 100)")
    _judge_options(p, "for --vet")
    p.set_defaults(invocation=None)  # main() fills in the command line, recorded in the evaluation


def _add_steer(sub) -> None:
    from tracelens.types import DEFAULT_MAX_KL, MIN_COHERENCE, N_CONTROLS

    p = _subparser(sub, "steer", steer, "coefficient grid (judged, with judge-free damage), then the best run "
                                         "within the KL budget reported on disjoint questions beside prompting "
                                         "and random controls")
    _experiment_options(p)
    p.add_argument("--layers", default="30%-60%", help=LAYERS_HELP)
    p.add_argument("--method", default="probe", help="which extracted vectors steer")
    p.add_argument("--position", default="response[:]", help="the extraction position whose vectors steer")
    p.add_argument("--component", default="residual", help=COMPONENT_HELP.format(what="steered"))
    p.add_argument("--coefficients", default=None,
                   help="explicit coefficients for every layer instead of the grid: the norm of the added vector "
                        "in hidden-state units, e.g. 50,100 (default: the grid, see --n-coefficients)")
    p.add_argument("--n-coefficients", type=int, default=6,
                   help="grid coefficients per layer, log-spaced from 0.02 to 1.0 x the layer's mean ||h|| / ||v|| "
                        "(0, the baseline, comes on top)")
    p.add_argument("--n-search", type=int, default=8, help="questions (the first N steering questions) that drive "
                                                          "the search")
    p.add_argument("--n-report", type=int, default=None,
                   help="questions of the rest that report the selected run (default: all the rest)")
    p.add_argument("--n-neutral", type=int, default=16,
                   help="neutral prompts whose unsteered answers measure the damage (NLL cost, KL)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens generated per answer")
    p.add_argument("--direction", choices=["positive", "negative"], default=None,
                   help="which way to push the trait (default: the trait's steering.json)")
    p.add_argument("--max-kl", type=float, default=DEFAULT_MAX_KL,
                   help="the damage budget: a run is selected only if its KL(unsteered || steered) on the neutral "
                        "answers is at most this many nats/token (runs over it are stored and shown)")
    p.add_argument("--min-coherence", type=float, default=MIN_COHERENCE,
                   help="judge coherence (0-100) a run must keep to be selected and reported; applied only "
                        "where the judge's coherence is shown valid on the coherence validation set")
    p.add_argument("--n-controls", type=int, default=N_CONTROLS,
                   help="random control directions (at least 10) the selected run is compared with")
    p.add_argument("--judge", choices=["offline", "openai"], default="offline",
                   help="offline: the shipped embedding judge (no network; its coherence includes fluency under "
                        "the unsteered model); openai: an LLM judge at --judge-url")
    _judge_options(p, "for --judge openai")
    p.set_defaults(invocation=None)  # main() fills in the command line, recorded in the results header


def _add_ab(sub) -> None:
    p = _subparser(sub, "ab", ab, "A/B dataset: extraction, detection and propensity curves per layer")
    p.add_argument("--data", default="optimism", help="an A/B file (.jsonl / .json) or a shipped set name")
    p.add_argument("--model", default="default", help="a model folder, a cached HF id, or 'default'")
    p.add_argument("--layers", default="all", help=LAYERS_HELP)
    p.add_argument("--method", default="mean_diff", help="extraction method")
    p.add_argument("--read", default="letter", choices=["after", "letter"],  # tracelens.pipeline.ab.READ_POSITIONS
                   help="the token whose activation is read and steered: the answer letter, or the one after it")
    p.add_argument("--component", default="residual", help=COMPONENT_HELP.format(what="read and steered"))
    p.add_argument("--multipliers", default="-2,-1,-0.5,0.5,1,2",
                   help="steering multipliers, in units of the train mean difference along the direction")
    p.add_argument("--splits", default="0.5,0.1,0.4", help="train,select,test fractions of the questions")
    p.add_argument("--seed", type=int, default=0, help="seed of the question split and the random directions")
    p.add_argument("--n-random", type=int, default=100, help="random directions for the detection chance band")
    p.add_argument("--batch-size", type=int, default=16, help="prompts per forward pass")
    p.add_argument("--out", required=True,
                   help="folder for report.json, vectors.safetensors, propensity.svg and propensity.md")
    p.set_defaults(invocation=None)  # main() fills in the command line, which propensity.md opens with


def _add_viewers(sub) -> None:
    p = _subparser(sub, "report", report, "render an experiment's stored results as Markdown (e.g. docs/results.md)")
    _experiment_options(p, traits=False)
    p.add_argument("--traits", default=None, help="comma-separated traits (default: every trait with an evaluation)")
    p.add_argument("--output", required=True, help="the Markdown file to write (atomically)")
    p.set_defaults(invocation=None)

    p = _subparser(sub, "list", list_, "experiments, their traits, stored vectors and steering runs with the "
                                       "selected run's report numbers")
    p.add_argument("--experiment", action="append", default=None,
                   help="only this experiment (repeatable; default: every experiment under $TRACELENS_EXPERIMENTS)")
    p.add_argument("--json", dest="as_json", action="store_true", help="print JSON instead of text")

    p = _subparser(sub, "dashboard", dashboard, "the Trait Dynamics dashboard for an experiment (a local web page; "
                                                "'serve' is an alias)", aliases=["serve"])
    p.add_argument("--experiment", required=True, help="experiment name under $TRACELENS_EXPERIMENTS")
    p.add_argument("--host", default="127.0.0.1", help="address to bind")
    p.add_argument("--port", type=int, default=8000, help="TCP port (0: any free port)")
    p.add_argument("--allow-remote", action="store_true",
                   help="allow a non-loopback address and any Host header; needs a token")
    p.add_argument("--token", default=None, help="required of every request; needed with --allow-remote "
                                                 "(default: $TRACELENS_DASHBOARD_TOKEN, else none)")


def _add_monitoring(sub) -> None:
    p = _subparser(sub, "monitor", monitor, "per-token projections of a prompt set's responses onto selected vectors")
    _experiment_options(p)
    p.add_argument("--prompt-set", required=True, help="a shipped set (general, neutral) or a JSON file")
    p.add_argument("--layers", default="best,best+5",
                   help=LAYERS_HELP + "; best / best+N / best-N: relative to the selected vector's layer")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens generated per response")
    p.add_argument("--one-pass", action="store_true", help="record projections while generating (one pass)")
    p.add_argument("--backend", choices=["local", "vllm"], default="local",
                   help="what generates the responses (vllm: bulk generation on GPUs; projections stay local)")

    p = _subparser(sub, "massive", massive, "calibrate massive-activation dims on neutral prompts")
    _experiment_options(p, traits=False)
    p.add_argument("--prompt-set", default="neutral", help="a shipped set or a JSON file")
    p.add_argument("--per-token", action="store_true", help="also store each prompt's per-token values")


def _add_server(sub) -> None:
    p = _subparser(sub, "server", server, "keep a model loaded and serve generation, capture and steering over "
                                          "HTTP (its own API and OpenAI's): --model MODEL as vllm serve does, or "
                                          "--experiment NAME, which adds steering by trait name")
    p.add_argument("--model", default=None, help="the model to serve: a Hugging Face id (cached), a folder, or "
                                                 "'default' (the embedded SmolLM2-135M-Instruct); its id in "
                                                 "/v1/models is this text (default: none, give --experiment)")
    p.add_argument("--lora", default=None, help="a LoRA adapter (folder or id) merged into --model (default: none)")
    p.add_argument("--experiment", default=None, help="serve this experiment's model (a folder under "
                                                      "$TRACELENS_EXPERIMENTS, default ./experiments) and steer by "
                                                      "its traits' vectors (default: none, give --model)")
    p.add_argument("--variant", default=None, help="model variant of --experiment's config (default: the config's "
                                                   "application default)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (non-loopback needs --token)")
    p.add_argument("--port", type=int, default=8765, help="TCP port (0: any free port)")
    p.add_argument("--token", default=None, help="bearer token every request must send; required to bind a "
                                                 "non-loopback host (default: $TRACELENS_SERVER_TOKEN, else none)")
    p.add_argument("--max-new-tokens-limit", type=int, default=1024, help="largest max_new_tokens a request may ask")
    p.add_argument("--max-prompts", type=int, default=256, help="most prompts in one request")
    p.add_argument("--request-timeout", type=float, default=600.0, help="seconds a request may wait and generate")
    p.add_argument("--io-timeout", type=float, default=30.0, help="seconds one socket read or write may block")
    p.add_argument("--stream-buffer", type=int, default=256, help="tokens a stream reader may fall behind")
    p.add_argument("--batching", choices=("continuous", "window"), default="continuous",
                   help="continuous: requests join the running batch between decode steps and leave as they finish; "
                        "window: requests start only into an empty batch, after --batch-window-ms")
    p.add_argument("--batch-window-ms", type=float, default=10.0,
                   help="with --batching window: milliseconds to gather requests into one batch (0: no waiting)")
    p.add_argument("--max-batch-size", type=int, default=16, help="most rows (prompts) decoding at once")
    p.add_argument("--max-queue", type=int, default=64, help="most requests waiting for the model; more get 503")


def build_parser() -> argparse.ArgumentParser:
    from tracelens.provenance import version

    parser = argparse.ArgumentParser(prog="tracelens", description="Trait directions in language models.",
                                     formatter_class=_Help)
    parser.add_argument("--version", action="version", version=f"tracelens {version()}")
    parser.add_argument("--debug", action="store_true", help="show the traceback instead of a one-line error "
                                                            "(also accepted after the subcommand)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = _subparser(sub, "demo", demo, "extract -> evaluate -> steer -> select -> report on the default model")
    p.add_argument("--trait", default="starter/enthusiasm", help="the trait to run, category/name")
    p.set_defaults(invocation=None)
    for add in (_add_extract, _add_steer, _add_ab, _add_viewers, _add_monitoring, _add_server):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run a command. Any `TracelensError` (a bad setting or input, a missing file, a failed judge or backend)
    and any other ValueError, KeyError or FileNotFoundError prints one line and returns 2; any other failure
    prints one line and returns 1; `--debug` shows the traceback instead."""
    from tracelens.errors import TracelensError

    argv = sys.argv[1:] if argv is None else list(argv)
    kwargs = vars(build_parser().parse_args(argv))
    func, command, debug = kwargs.pop("func"), kwargs.pop("command"), kwargs.pop("debug")
    if "invocation" in kwargs:
        kwargs["invocation"] = shlex.join(["tracelens", *argv])
    try:
        func(**kwargs)
    except (TracelensError, ValueError, KeyError, FileNotFoundError) as err:
        if debug:
            raise
        print(f"tracelens {command}: error: {_message(err)}", file=sys.stderr)
        return 2
    except Exception as err:  # noqa: BLE001 - the command line reports every failure in one line
        if debug:
            raise
        print(f"tracelens {command}: {type(err).__name__}: {_message(err)} (--debug for the traceback)",
              file=sys.stderr)
        return 1
    return 0


def _message(err: BaseException) -> str:
    return str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)


if __name__ == "__main__":
    sys.exit(main())
