"""Model server soak: staggered clients on loopback for a fixed time; every answer checked by content; RSS sampled.

A `ModelServer` (continuous batching) on 127.0.0.1 serves the model. First every request kind (a prompt x a
steering vector or none x a length) is asked alone, one at a time, through the server's own API and through
OpenAI chat: those are the expected answers. Then ``--clients`` client threads start 0.2 s apart and, until
``--minutes`` have passed, each sends a random kind in a random way: own API, OpenAI chat, OpenAI chat streamed
(the pieces joined), or a stream it drops after two tokens (its row must leave the batch), with a random pause of
up to 0.5 s between requests. Every answer must equal its kind's expected answer (a mismatch would be another
request's tokens or steering in it). The process's resident memory (the server runs in it) is sampled every
``--sample-s`` seconds.

Printed: requests, mismatches, errors, dropped streams, the RSS curve and its growth after the first quarter;
the batch must be empty at the end. Exits 1 on any mismatch or error.

    python scripts/bench/server_soak.py [--model default|tiny] [--minutes 10] [--clients 8] [--norm 16]
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import socket
import threading
import time
from urllib.parse import urlsplit

from common import reexec_with_malloc_settings  # noqa: E402

reexec_with_malloc_settings()

import openai  # noqa: E402
import torch  # noqa: E402

from tracelens.app.server import ModelServer  # noqa: E402
from tracelens.serving.backends import GenerationConfig, LocalBackend, SteeringSpec  # noqa: E402
from tracelens.serving.client import RemoteBackend  # noqa: E402

PROMPTS = ["What is the capital of France?", "Tell me about cats.", "Will it rain tomorrow?",
           "Describe a sunny day.", "What do trees need to grow?", "Give me a reason to smile."]
MODES = ("own", "chat", "chat-stream", "drop")


def _backend(name: str) -> LocalBackend:
    if name == "tiny":
        from tracelens.testing import tiny_model

        return LocalBackend.from_model(tiny_model("llama").model)
    from tracelens import load_model
    from tracelens.model.default_model import default_model_path

    return LocalBackend.from_model(load_model(default_model_path(), device="cpu"))


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


class _Soak:
    def __init__(self, srv: ModelServer, layer: int, vectors: list[torch.Tensor | None], lengths: list[int]) -> None:
        self.srv, self.layer = srv, layer
        self.remote = RemoteBackend(srv.url, timeout=600)
        self.client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=600)
        self.kinds = list(itertools.product(range(len(PROMPTS)), range(len(vectors)), lengths))
        self.vectors = vectors
        self.counts = {"requests": 0, "mismatches": 0, "errors": 0, "dropped": 0}
        self.lock = threading.Lock()
        self.expected: dict[tuple, str] = {}

    def _steering(self, v: int) -> list[dict]:
        vec = self.vectors[v]
        return [] if vec is None else [{"layer": self.layer, "vector": vec.tolist()}]

    def ask(self, mode: str, kind: tuple) -> str | None:
        p, v, n = kind
        if mode == "own":
            specs = [SteeringSpec(layer=self.layer, vector=self.vectors[v])] if self.vectors[v] is not None else None
            return self.remote.generate([PROMPTS[p]], GenerationConfig(max_new_tokens=n), specs)[0]
        body = {"model": self.srv.model_id, "messages": [{"role": "user", "content": PROMPTS[p]}], "max_tokens": n,
                "temperature": 0, "extra_body": {"steering": self._steering(v)}}
        if mode == "chat":
            return self.client.chat.completions.create(**body).choices[0].message.content
        if mode == "chat-stream":
            return "".join(c.choices[0].delta.content or "" for c in self.client.chat.completions.create(
                **body, stream=True) if c.choices)
        return self._drop(kind)

    def _drop(self, kind: tuple) -> None:
        """Open a /stream, read two token lines, and close the connection."""
        p, v, n = kind
        url = urlsplit(self.srv.url)
        body = json.dumps({"prompt": PROMPTS[p], "config": {"max_new_tokens": n},
                           "steering": self._steering(v)}).encode()
        with socket.create_connection((url.hostname, url.port), timeout=60) as sock:
            sock.sendall(b"POST /stream HTTP/1.0\r\nHost: " + url.netloc.encode()
                         + b"\r\nContent-Type: application/json"
                         b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
            got = b""
            while got.count(b"\n{") < 3 and (chunk := sock.recv(4096)):  # the headers end, two tokens
                got += chunk
        return None

    def expect_all(self) -> None:
        for kind in self.kinds:
            for mode in ("own", "chat"):
                self.expected[mode, kind] = self.ask(mode, kind)

    def client_loop(self, k: int, deadline: float) -> None:
        rng = random.Random(k)
        time.sleep(0.2 * k)
        while time.monotonic() < deadline:
            mode, kind = rng.choice(MODES), rng.choice(self.kinds)
            try:
                got = self.ask(mode, kind)
                want = None if mode == "drop" else self.expected["own" if mode == "own" else "chat", kind]
                with self.lock:
                    self.counts["requests"] += 1
                    self.counts["dropped"] += mode == "drop"
                    self.counts["mismatches"] += got != want
            except Exception as err:  # counted and shown; the soak goes on
                with self.lock:
                    self.counts["requests"] += 1
                    self.counts["errors"] += 1
                print(f"client {k}: {mode} error {type(err).__name__}: {err}")
            time.sleep(rng.uniform(0, 0.5))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=["default", "tiny"], default="default")
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--sample-s", type=float, default=10.0)
    ap.add_argument("--norm", type=float, default=16.0,
                    help="the steering vectors' norm (large enough to change answers)")
    args = ap.parse_args()

    backend = _backend(args.model)
    d, layer = backend.hidden_dim, backend.n_layers // 2
    vectors = [None] + [args.norm * v / v.norm() for v in (torch.randn(d, generator=torch.Generator().manual_seed(i))
                                                     for i in range(2))]
    with ModelServer(backend, port=0, verbose=False, max_batch_size=16, max_new_tokens_limit=64).start() as srv:
        soak = _Soak(srv, layer, vectors, [8, 24])
        soak.expect_all()
        samples: list[tuple[float, float]] = []
        start = time.monotonic()
        deadline = start + 60 * args.minutes
        threads = [threading.Thread(target=soak.client_loop, args=(k, deadline)) for k in range(args.clients)]
        for t in threads:
            t.start()
        next_sample = start
        while any(t.is_alive() for t in threads):
            if time.monotonic() >= next_sample:
                samples.append((time.monotonic() - start, _rss_mib()))
                next_sample += args.sample_s
            time.sleep(0.05)
        for t in threads:
            t.join()
        samples.append((time.monotonic() - start, _rss_mib()))
        time.sleep(0.5)  # dropped streams' rows leave at the next step
        left = (srv.batcher.rows, len(srv.batcher.pending))
    c = soak.counts
    print(f"model: {args.model}, {args.clients} clients, {args.minutes:g} min, {len(soak.kinds)} request kinds x "
          f"{len(MODES)} ways, torch threads {torch.get_num_threads()}")
    print(f"expected answers: {len(set(soak.expected.values()))} distinct of {len(soak.expected)} (a mixed-up answer "
          "shows)")
    print(f"requests {c['requests']}, mismatches {c['mismatches']}, errors {c['errors']}, dropped streams "
          f"{c['dropped']}; rows and queued requests left at the end: {left[0]}, {left[1]}")
    print("RSS MiB: " + ", ".join(f"{t:.0f}s {m:.0f}" for t, m in samples))
    warm = [m for t, m in samples if t >= 60 * args.minutes / 4] or [samples[-1][1]]
    print(f"RSS after the first quarter: {warm[0]:.0f} -> {samples[-1][1]:.0f} MiB (max {max(warm):.0f})")
    if c["mismatches"] or c["errors"] or left != (0, 0):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
