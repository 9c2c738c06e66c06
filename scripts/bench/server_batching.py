"""Model server throughput and time to first token: continuous batching against the window batcher, in one process.

A `ModelServer` on 127.0.0.1 serves the model, once with ``batching="continuous"`` and once with ``"window"`` (the
earlier policy, on the same engine). Requests are greedy chat completions through the `openai` client, each with
its own steering vector (an extra field), ``--new-tokens`` long. Per policy and round:

- throughput: N requests one by one, then the same N from N client threads at once (N = 6 and 16); printed as the
  ratio one by one / parallel. The parallel answers must equal the one-by-one answers (asserted);
- time to first token (streamed; the first chunk, sent once the first token exists): each of 6 requests alone on
  an idle server, then under load: 16 clients that start 0.25 s apart and each stream 2 requests back to back.
  Printed: p50 and p95 in seconds.

Medians over ``--rounds`` rounds after one untimed warm-up round. The one-by-one time is the same work for both
policies (one request at a time), measured on each. First, the ceiling: the plain HF model's own ``generate``
(its default attention, no hooks, exactly ``--new-tokens`` tokens) on the same chat prompts at batch 6 and 16,
as tokens per second over batch 1: what N clients could gain at most from batching on this machine.

    python scripts/bench/server_batching.py [--model default|tiny] [--rounds 2] [--new-tokens 32]

`--model tiny` runs a 2-layer random model (seconds; only shows the script works, its timings mean nothing).
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

from common import reexec_with_malloc_settings  # noqa: E402

reexec_with_malloc_settings()

import openai  # noqa: E402
import torch  # noqa: E402

from tracelens.app.server import ModelServer  # noqa: E402
from tracelens.model.prompts import tokenize_batch  # noqa: E402
from tracelens.serving.backends import LocalBackend  # noqa: E402

PROMPTS = ["What is the capital of France?", "Tell me about cats.", "Will it rain tomorrow?",
           "Describe a sunny day.", "What do trees need to grow?", "Give me a reason to smile.",
           "How do birds fly?", "Name a good book.", "Why is the sky blue?", "What is a river?",
           "Tell me a short story.", "How do I make tea?", "What is music?", "Describe the sea.",
           "What is a friend?", "Why do we sleep?"]


def _models(name: str):
    """(the served backend, an untouched HF copy of its model)."""
    if name == "tiny":
        from tracelens.testing import tiny_model

        tiny = tiny_model("llama")
        return LocalBackend.from_model(tiny.model), tiny.reference
    from transformers import AutoModelForCausalLM

    from tracelens import load_model
    from tracelens.model.default_model import default_model_path

    path = default_model_path()
    return LocalBackend.from_model(load_model(path, device="cpu")), AutoModelForCausalLM.from_pretrained(path).eval()


def _hf_ceiling(backend: LocalBackend, hf, new_tokens: int) -> dict[int, float]:
    """Tokens per second of HF ``generate`` at batch 1, 6 and 16 on the chat-formatted prompts (best of 2)."""
    texts = [backend.format(p) for p in PROMPTS]
    out = {}
    for n in (1, 6, 16):
        ids, mask = tokenize_batch(backend.tokenizer, texts[:n])
        best = math.inf
        for _ in range(2):
            start = time.perf_counter()
            with torch.inference_mode():
                hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                            do_sample=False, pad_token_id=backend.tokenizer.pad_token_id)
            best = min(best, time.perf_counter() - start)
        out[n] = n * new_tokens / best
    return out


def _parallel(calls) -> list:
    """Run the callables on one thread each, all at once; their results in order (an exception is re-raised)."""
    with ThreadPoolExecutor(max_workers=len(calls)) as pool:
        return [f.result() for f in [pool.submit(c) for c in calls]]


def _percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


class _Clients:
    def __init__(self, url: str, model: str, layer: int, vectors: list[torch.Tensor], new_tokens: int) -> None:
        self.client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600)
        self.model, self.layer, self.vectors, self.new_tokens = model, layer, vectors, new_tokens

    def _body(self, i: int) -> dict:
        return {"model": self.model, "messages": [{"role": "user", "content": PROMPTS[i]}],
                "max_tokens": self.new_tokens, "temperature": 0,
                "extra_body": {"steering": [{"layer": self.layer, "vector": self.vectors[i].tolist()}]}}

    def answer(self, i: int) -> str:
        return self.client.chat.completions.create(**self._body(i)).choices[0].message.content

    def ttft(self, i: int) -> float:
        """Seconds from sending a streamed request to its first chunk (the stream is read to its end)."""
        start = time.perf_counter()
        first = None
        for _ in self.client.chat.completions.create(**self._body(i), stream=True):
            first = first or time.perf_counter() - start
        return first


def _round(c: _Clients) -> dict[str, float]:
    out = {}
    for n in (6, 16):
        start = time.perf_counter()
        sequential = [c.answer(i) for i in range(n)]
        out[f"seq{n}"] = time.perf_counter() - start
        start = time.perf_counter()
        parallel = _parallel([lambda i=i: c.answer(i) for i in range(n)])
        out[f"par{n}"] = time.perf_counter() - start
        assert parallel == sequential, f"{n} parallel answers differ from the one-by-one answers"
    idle = [c.ttft(i) for i in range(6)]

    def client(k: int) -> list[float]:
        time.sleep(0.25 * k)
        return [c.ttft(k), c.ttft((k + 1) % len(PROMPTS))]

    loaded = [t for ts in _parallel([lambda k=k: client(k) for k in range(16)]) for t in ts]
    out.update(idle_p50=_percentile(idle, 0.5), idle_p95=_percentile(idle, 0.95),
               load_p50=_percentile(loaded, 0.5), load_p95=_percentile(loaded, 0.95))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=["default", "tiny"], default="default")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=32)
    args = ap.parse_args()

    backend, hf = _models(args.model)
    d, layer = backend.hidden_dim, backend.n_layers // 2
    vectors = [torch.randn(d, generator=torch.Generator().manual_seed(i)) for i in range(len(PROMPTS))]
    vectors = [4.0 * v / v.norm() for v in vectors]
    print(f"model: {args.model}, {args.new_tokens} new tokens per request (greedy chat completions, one steering "
          f"vector each, OpenAI API), max batch 16, torch threads {torch.get_num_threads()}, {args.rounds} rounds")
    ceiling = _hf_ceiling(backend, hf, args.new_tokens)
    print(f"ceiling: HF generate {ceiling[1]:.1f} tokens/s at batch 1; batch 6 {ceiling[6] / ceiling[1]:.2f}x, "
          f"batch 16 {ceiling[16] / ceiling[1]:.2f}x of that")
    del hf
    for policy in ("continuous", "window"):
        with ModelServer(backend, port=0, verbose=False, batching=policy, max_batch_size=16,
                         max_new_tokens_limit=args.new_tokens).start() as srv:
            clients = _Clients(srv.url, srv.model_id, layer, vectors, args.new_tokens)
            rounds = [_round(clients) for _ in range(args.rounds + 1)][1:]  # the first warms up
        m = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
        print(f"{policy}: 6 clients: one by one {m['seq6']:.2f} s, parallel {m['par6']:.2f} s, throughput ratio "
              f"{m['seq6'] / m['par6']:.2f}x; 16 clients: one by one {m['seq16']:.2f} s, parallel {m['par16']:.2f} s, "
              f"ratio {m['seq16'] / m['par16']:.2f}x (identical answers)")
        print(f"{policy}: time to first token idle p50 {m['idle_p50']:.3f} s p95 {m['idle_p95']:.3f} s; under load "
              f"(16 staggered clients) p50 {m['load_p50']:.3f} s p95 {m['load_p95']:.3f} s")


if __name__ == "__main__":
    main()
