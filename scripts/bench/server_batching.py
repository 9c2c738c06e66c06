"""Model server throughput: 6 parallel clients against the same 6 requests one by one, in one process.

A `ModelServer` on 127.0.0.1 serves the model; each round sends the 6 greedy requests (6 prompts, each with its
own steering vector) one after another, then all 6 at once from 6 threads, through the server's own API
(`RemoteBackend.generate`) and through the OpenAI API (the `openai` client, `/v1/chat/completions` with the
steering as an extra field). Answers must be identical between the two ways (asserted), and the one-by-one
answers equal local generation. Printed: seconds per way (median over rounds) and the throughput ratio
sequential / parallel. Target (issue 14): parallel >= 2x (goal 4x) on the default model on CPU.

    python scripts/bench/server_batching.py [--model default|tiny] [--rounds 3] [--new-tokens 32]
                                            [--window-ms 10] [--max-batch-size 16]

`--model tiny` runs a 2-layer random model (seconds; only shows the script works, its timings mean nothing).
"""

from __future__ import annotations

import argparse
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

from common import reexec_with_malloc_settings  # noqa: E402

reexec_with_malloc_settings()

import openai  # noqa: E402
import torch  # noqa: E402

from tracelens.serving.backends import GenerationConfig, LocalBackend, SteeringSpec  # noqa: E402
from tracelens.serving.client import RemoteBackend  # noqa: E402
from tracelens.app.server import ModelServer  # noqa: E402

PROMPTS = ["What is the capital of France?", "Tell me about cats.", "Will it rain tomorrow?",
           "Describe a sunny day.", "What do trees need to grow?", "Give me a reason to smile."]


def _backend(name: str) -> LocalBackend:
    if name == "tiny":
        from tracelens.testing import tiny_model

        return LocalBackend.from_model(tiny_model("llama").model)
    from tracelens import load_model
    from tracelens.model.default_model import default_model_path

    return LocalBackend.from_model(load_model(default_model_path(), device="cpu"))


def _parallel(calls) -> list:
    """Run the callables on one thread each, all at once; their results in order (an exception is re-raised)."""
    with ThreadPoolExecutor(max_workers=len(calls)) as pool:
        return [f.result() for f in [pool.submit(c) for c in calls]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=["default", "tiny"], default="default")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--window-ms", type=float, default=10.0)
    ap.add_argument("--max-batch-size", type=int, default=16)
    args = ap.parse_args()

    backend = _backend(args.model)
    d, layer = backend.hidden_dim, backend.n_layers // 2
    vectors = [torch.randn(d, generator=torch.Generator().manual_seed(i)) for i in range(len(PROMPTS))]
    vectors = [4.0 * v / v.norm() for v in vectors]
    cfg = GenerationConfig(max_new_tokens=args.new_tokens)
    with ModelServer(backend, "bench", port=0, verbose=False, batch_window_ms=args.window_ms,
                     max_batch_size=args.max_batch_size, max_new_tokens_limit=max(args.new_tokens, 1)).start() as srv:
        remote = RemoteBackend(srv.url, timeout=600)
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=600)
        own = [lambda p=p, v=v: remote.generate([p], cfg, [SteeringSpec(layer=layer, vector=v, coefficient=1.0)])[0]
               for p, v in zip(PROMPTS, vectors)]
        oai = [lambda p=p, v=v: client.chat.completions.create(
            model="bench", messages=[{"role": "user", "content": p}], max_tokens=args.new_tokens, temperature=0,
            extra_body={"steering": [{"layer": layer, "vector": v.tolist()}]}).choices[0].message.content
            for p, v in zip(PROMPTS, vectors)]
        local = [backend.generate([p], cfg, [SteeringSpec(layer=layer, vector=v, coefficient=1.0)])[0] for p, v in zip(PROMPTS, vectors)]
        print(f"model: {args.model}, {len(PROMPTS)} requests x {args.new_tokens} new tokens (greedy, one steering "
              f"vector each), window {args.window_ms:g} ms, max batch {args.max_batch_size}, "
              f"torch threads {torch.get_num_threads()}, {args.rounds} rounds")
        for api, calls in (("own API", own), ("OpenAI API", oai)):
            times: dict[str, list[float]] = {"one by one": [], "6 parallel": []}
            for _ in range(args.rounds + 1):  # the first round warms up and is not timed
                start = time.perf_counter()
                sequential = [c() for c in calls]
                t_seq = time.perf_counter() - start
                start = time.perf_counter()
                parallel = _parallel(calls)
                t_par = time.perf_counter() - start
                assert parallel == sequential, f"{api}: parallel answers differ from one-by-one answers"
                if api == "own API":
                    assert sequential == local, "own API: answers differ from local generation"
                times["one by one"].append(t_seq)
                times["6 parallel"].append(t_par)
            med = {k: statistics.median(v[1:]) for k, v in times.items()}
            print(f"{api}: one by one {med['one by one']:.2f} s, 6 parallel {med['6 parallel']:.2f} s, "
                  f"throughput ratio {med['one by one'] / med['6 parallel']:.2f}x (identical answers)")


if __name__ == "__main__":
    main()
