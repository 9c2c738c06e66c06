"""The `tracelens` command line: a thin shell over the library's pipeline functions."""

from __future__ import annotations

import argparse
import sys


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _vllm_backend(args: argparse.Namespace, mode: str):
    """A `VLLMBackend` for the variant of ``args`` (experiment, variant); ValueError for a LoRA variant, whose
    adapter the vLLM backend does not load (its responses would be the base model's)."""
    from tracelens.errors import ConfigError
    from tracelens.pipeline.experiments import get_model_variant

    mv = get_model_variant(args.experiment, args.variant, mode=mode)
    if mv.lora is not None:
        raise ConfigError(f"--backend vllm needs a variant without a LoRA adapter; got {mv.name!r} with lora "
                         f"{mv.lora!r} (use --backend local, which merges the adapter)")
    from tracelens.serving.vllm_backend import VLLMBackend

    return VLLMBackend(mv.model)


def demo(args: argparse.Namespace) -> None:
    from tracelens.pipeline.demo import DemoSettings, run_demo
    from tracelens.model.loading import load_model

    run_demo(load_model("default"), DemoSettings(trait=args.trait))


def extract(args: argparse.Namespace) -> None:
    from tracelens.pipeline.extraction import ExtractionConfig, run_extraction

    config = ExtractionConfig(
        methods=_csv(args.methods), position=args.position, layers=args.layers, component=args.component,
        splits=[float(x) for x in _csv(args.splits)], max_new_tokens=args.max_new_tokens, force=args.force,
    )
    vet_judge = None
    if args.vet:
        from tracelens.judges.openai import OpenAIJudge

        vet_judge = OpenAIJudge(args.judge_url, model=args.judge_model)
    response_backend = _vllm_backend(args, "extraction") if args.backend == "vllm" else None
    evaluations = run_extraction(args.experiment, _csv(args.traits), config, variant=args.variant,
                                 vet_judge=vet_judge, response_backend=response_backend)
    from tracelens.metrics import Estimate

    for trait, evaluation in evaluations.items():
        row = evaluation.selected_row
        band = evaluation.chance["layers"][str(row.layer)]["auroc"]
        print(f"{trait}: selected {row.method} layer {row.layer} (select AUROC {row.select['auroc']:.3f}); "
              f"test AUROC {Estimate.from_dict(row.test['auroc']):.3f}, accuracy "
              f"{Estimate.from_dict(row.test['accuracy']):.3f}; random directions {band['lo']:.3f}-{band['hi']:.3f}"
              f"{'' if row.above_chance else ' (NOT above chance)'}")


def steer(args: argparse.Namespace) -> None:
    from tracelens.pipeline.experiments import get_model_variant
    from tracelens.judges.offline import offline_judge
    from tracelens.judges.openai import OpenAIJudge
    from tracelens.metrics import Estimate
    from tracelens.pipeline.steering_eval import SteeringEvalConfig, judge_validity, run_steering_eval

    config = SteeringEvalConfig(
        layers=args.layers, method=args.method, position=args.position, component=args.component,
        coefficients=[float(c) for c in _csv(args.coefficients)] if args.coefficients else None,
        search_steps=args.search_steps, n_search=args.n_search, n_report=args.n_report,
        max_new_tokens=args.max_new_tokens, direction=args.direction, n_neutral=args.n_neutral,
    )
    variant = get_model_variant(args.experiment, args.variant, mode="extraction").name
    for trait in _csv(args.traits):
        judge = offline_judge(trait) if args.judge == "offline" else OpenAIJudge(args.judge_url, model=args.judge_model)
        validity = judge_validity(judge, args.experiment, trait, variant, args.position, args.component)
        print(f"{trait}: judge {judge.name}: validity on the unseen test-split answers AUROC "
              f"{Estimate.from_dict(validity['auroc']):.3f}")
        results = run_steering_eval(args.experiment, trait, judge, config, variant=args.variant,
                                    judge_info={"validity": validity})
        base = results.baseline
        print(f"{trait}: baseline (search questions) trait {base.trait_mean} coherence {base.coherence_mean}")
        for run in results.runs:
            jf, ctl = run.judge_free, run.control
            print(f"  layer {run.layer} coef {run.coefficient:.1f}: trait {run.result.trait_mean} coherence "
                  f"{run.result.coherence_mean}; trait effect {Estimate.from_dict(jf['trait_effect']):.3f} "
                  f"(control {Estimate.from_dict(ctl['trait_effect']):.3f}), NLL cost "
                  f"{Estimate.from_dict(jf['nll_cost']):.3f} (control {Estimate.from_dict(ctl['nll_cost']):.3f}) nats/token")
        r = results.report
        if r is None:
            print(f"{trait}: no run kept coherence >= {config.min_coherence}: nothing reported")
        else:
            v = r["config"]["vectors"][0]
            print(f"{trait}: selected layer {v['layer']} coef {v['weight']:.1f}, on {r['n_questions']} report "
                  f"questions: trait delta {Estimate.from_dict(r['trait_delta']['steered']):.1f} vs random control "
                  f"{Estimate.from_dict(r['trait_delta']['control']):.1f}")


def report(args: argparse.Namespace) -> None:
    from tracelens.pipeline.report import write_report

    traits = _csv(args.traits) if args.traits else None
    print(f"wrote {write_report(args.experiment, traits, args.output, variant=args.variant)}")


def monitor(args: argparse.Namespace) -> None:
    from tracelens.pipeline.monitoring import MonitorConfig, run_monitoring

    config = MonitorConfig(layers=args.layers, max_new_tokens=args.max_new_tokens, one_pass=args.one_pass)
    response_backend = _vllm_backend(args, "application") if args.backend == "vllm" else None
    written = run_monitoring(args.experiment, args.prompt_set, _csv(args.traits), config, variant=args.variant,
                             response_backend=response_backend)
    print(f"wrote {written['responses']} response records and {written['projections']} projection records")


def massive(args: argparse.Namespace) -> None:
    from tracelens.model.massive import candidate_dims
    from tracelens.pipeline.monitoring import run_massive

    report = run_massive(args.experiment, args.prompt_set, args.per_token, variant=args.variant)
    agg = report["aggregate"]
    print(f"{agg['tokens_seen']} tokens from {agg['n_prompts']} prompts")
    for dim in candidate_dims(report, "top5-3layers"):
        peak = max(agg["dim_magnitude_by_layer"][str(dim)])
        print(f"dim {dim}: up to {peak:.0f}x the mean |activation| of its layer")


def dashboard(args: argparse.Namespace) -> None:
    from tracelens.serving.dashboard import main_dashboard

    main_dashboard(args)


def server(args: argparse.Namespace) -> None:
    from tracelens.serving.server import main_server

    main_server(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tracelens", description="Trait directions in language models.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="extract -> evaluate -> steer -> select on the default model")
    p.add_argument("--trait", default="starter/enthusiasm")
    p.set_defaults(func=demo)

    p = sub.add_parser("extract", help="generate contrastive responses, capture activations, fit and evaluate vectors")
    p.add_argument("--experiment", required=True)
    p.add_argument("--traits", required=True, help="category/trait[,category/trait...]")
    p.add_argument("--variant", default=None)
    p.add_argument("--methods", default="probe,mean_diff,gradient")
    p.add_argument("--position", default=None, help="position DSL, e.g. 'response[:]' (default by model type)")
    p.add_argument("--layers", default="all", help="all | 30%%-60%% | 0-20:5 | 3,5,-1, comma-separated")
    p.add_argument("--component", default="residual")
    p.add_argument("--splits", default="0.6,0.2,0.2",
                   help="train,select,test fractions of the questions (answers of one question stay together)")
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--force", action="store_true", help="recompute every stage")
    p.add_argument("--backend", choices=["local", "vllm"], default="local",
                   help="what generates the responses (vllm: bulk generation on GPUs; capture stays local)")
    p.add_argument("--vet", action="store_true", help="keep only pairs an LLM judge scores pos >= 60, neg <= 40")
    p.add_argument("--judge-url", default="https://api.openai.com/v1", help="chat-completions endpoint for --vet")
    p.add_argument("--judge-model", default="gpt-4.1-mini")
    p.set_defaults(func=extract)

    p = sub.add_parser("steer", help="coefficient search (judged, judge-free metrics, random control), then a report "
                                     "on disjoint questions")
    p.add_argument("--experiment", required=True)
    p.add_argument("--traits", required=True)
    p.add_argument("--variant", default=None)
    p.add_argument("--layers", default="30%-60%", help="as for extract")
    p.add_argument("--method", default="probe")
    p.add_argument("--position", default="response[:]")
    p.add_argument("--component", default="residual")
    p.add_argument("--coefficients", default=None, help="explicit coefficients (no search), e.g. 50,100")
    p.add_argument("--search-steps", type=int, default=5)
    p.add_argument("--n-search", type=int, default=8, help="the first N steering questions drive the search")
    p.add_argument("--n-report", type=int, default=None,
                   help="how many of the remaining questions report the selected run (default: all)")
    p.add_argument("--n-neutral", type=int, default=16, help="neutral prompts for the coherence cost")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--direction", choices=["positive", "negative"], default=None)
    p.add_argument("--judge", choices=["offline", "openai"], default="offline")
    p.add_argument("--judge-url", default="https://api.openai.com/v1")
    p.add_argument("--judge-model", default="gpt-4.1-mini")
    p.set_defaults(func=steer)

    from tracelens.pipeline.ab import add_ab_parser

    add_ab_parser(sub)

    p = sub.add_parser("report", help="render an experiment's stored results as Markdown (e.g. docs/results.md)")
    p.add_argument("--experiment", required=True)
    p.add_argument("--traits", default=None, help="default: every trait with an evaluation")
    p.add_argument("--variant", default=None)
    p.add_argument("--output", required=True, help="the Markdown file to write")
    p.set_defaults(func=report)

    p = sub.add_parser("monitor", help="per-token projections of a prompt set's responses onto selected vectors")
    p.add_argument("--experiment", required=True)
    p.add_argument("--prompt-set", required=True, help="a shipped set (general, neutral) or a JSON file")
    p.add_argument("--traits", required=True)
    p.add_argument("--variant", default=None)
    p.add_argument("--layers", default="best,best+5",
                   help="as for extract, plus best / best+N / best-N (best: the selected vector's layer)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--one-pass", action="store_true", help="record projections while generating")
    p.add_argument("--backend", choices=["local", "vllm"], default="local",
                   help="what generates the responses (vllm: bulk generation on GPUs; projections stay local)")
    p.set_defaults(func=monitor)

    p = sub.add_parser("massive", help="calibrate massive activation dims on neutral prompts")
    p.add_argument("--experiment", required=True)
    p.add_argument("--prompt-set", default="neutral")
    p.add_argument("--variant", default=None)
    p.add_argument("--per-token", action="store_true")
    p.set_defaults(func=massive)

    p = sub.add_parser("dashboard", aliases=["serve"],
                       help="the Trait Dynamics dashboard for an experiment (local web page; 'serve' is an alias)")
    p.add_argument("--experiment", required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--allow-remote", action="store_true",
                   help="allow a non-loopback address and any Host header; needs a token")
    p.add_argument("--token", default=None,
                   help="required of every request; needed with --allow-remote ($TRACELENS_DASHBOARD_TOKEN)")
    p.set_defaults(func=dashboard)

    p = sub.add_parser("server", help="keep an experiment's model loaded and serve generation/capture/steering")
    p.add_argument("--experiment", required=True)
    p.add_argument("--variant", default=None)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--token", default=None, help="required to bind a non-loopback host ($TRACELENS_SERVER_TOKEN)")
    p.add_argument("--max-new-tokens-limit", type=int, default=None, help="largest max_new_tokens a request may ask")
    p.add_argument("--max-prompts", type=int, default=None, help="most prompts in one request (default 256)")
    p.add_argument("--request-timeout", type=float, default=None, help="seconds a request may wait and generate")
    p.add_argument("--io-timeout", type=float, default=None, help="seconds one socket read or write may block")
    p.add_argument("--stream-buffer", type=int, default=None, help="tokens a stream reader may fall behind")
    p.add_argument("--batch-window-ms", type=float, default=None,
                   help="milliseconds to gather concurrent requests into one batch (0: no waiting)")
    p.add_argument("--max-batch-size", type=int, default=None, help="most prompts in one batch")
    p.add_argument("--max-queue", type=int, default=None, help="most requests waiting for the model; more get 503")
    p.set_defaults(func=server)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run a command. Any `TracelensError` (a bad setting or input, a missing file, a failed judge or backend)
    and any other ValueError, KeyError or FileNotFoundError prints one line and returns 2; any other failure
    prints one line and returns 1; `--debug` shows the traceback instead."""
    from tracelens.errors import TracelensError

    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (TracelensError, ValueError, KeyError, FileNotFoundError) as err:
        if args.debug:
            raise
        print(f"tracelens {args.command}: error: {_message(err)}", file=sys.stderr)
        return 2
    except Exception as err:  # noqa: BLE001 - the command line reports every failure in one line
        if args.debug:
            raise
        print(f"tracelens {args.command}: {type(err).__name__}: {_message(err)} (--debug for the traceback)",
              file=sys.stderr)
        return 1
    return 0


def _message(err: BaseException) -> str:
    return str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)


if __name__ == "__main__":
    sys.exit(main())
