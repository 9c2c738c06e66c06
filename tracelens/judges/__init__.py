"""Judges: score how strongly a response expresses a trait, and how coherent it is, each on 0-100.

Every judge follows the ``Judge`` protocol: ``score_trait(question, response, trait_name, definition)`` and
``score_coherence(question, response)`` return a float in [0, 100], or None when the judge cannot decide, and
``score(items)`` scores a batch into ``[{"trait_score", "coherence_score", "degenerate"}, ...]`` in input
order, ready for ``summarize_judge_scores``. ``score`` applies the degeneracy guard to every judge: an answer
that ``degeneracy()`` flags (empty, one token looping, repeated phrases) gets coherence 0.0 whatever the judge
said, and its ``"degenerate"`` names why (None otherwise). Two judges:

- ``OpenAIJudge``: an LLM behind any OpenAI-compatible chat-completions endpoint (OpenAI, vLLM, llama.cpp
  server), scored with the upstream logprob method. This is the reference judge.
- ``EmbeddingJudge``: an offline stand-in for machines without an endpoint: a classifier plus a
  deterministic repetition/relevance coherence measure. ``offline_judge(trait)`` fits it on the trait's
  hand-labelled ``judge_corpus.jsonl``, never on the responses the vectors were extracted from, and names the
  corpus in ``judge.name``. It is not a general judge; ``validity()`` measures how well it separates
  responses it did not see, and runs report it.

Judging offline with a local LLM (a machine with a GPU): run any server that speaks OpenAI chat completions
with ``logprobs``/``top_logprobs`` on loopback, and point ``--judge-url`` at its ``/v1`` root, e.g.::

    vllm serve Qwen/Qwen2.5-7B-Instruct --port 8000      # or: llama-server -m judge.gguf --port 8000
    tracelens steer ... --judge openai --judge-url http://127.0.0.1:8000/v1 --judge-model Qwen/Qwen2.5-7B-Instruct

``--judge-model`` is sent as each request's ``model`` (vLLM answers only to the name it serves, the id given
to ``vllm serve``); no API key is sent when none is given, and loopback requests bypass proxies. Each request
asks for ``top_logprobs=20`` on one token: a server that caps it lower must be raised (vLLM:
``--max-logprobs 20``), and one that ignores ``logprobs`` (older llama-server builds) makes the judge stop
with a ``JudgeError`` saying so. To check a server before a run, score one answer:
``OpenAIJudge("http://127.0.0.1:8000/v1", model=M).score_coherence("Hi", "Hello!")`` returns a number (or
None) when the server answers with ``choices[0].logprobs.content[0].top_logprobs``, and raises ``JudgeError``
naming what is wrong when it does not. The tests run ``OpenAIJudge``, built the way the CLI builds it, against
a stand-in server on 127.0.0.1 that answers in that format; no vLLM or llama-server was run in them.

Modules: ``base`` (the protocol, batch scoring, the summary), ``openai`` (the LLM judge), ``offline``
(the embedding stand-in), ``fluency`` (a causal LM's NLL of a response, which ``EmbeddingJudge(fluency=...)``
adds to its coherence), ``degeneracy``.
"""

from tracelens.judges.base import Judge, summarize_judge_scores
from tracelens.judges.degeneracy import Degeneracy, degeneracy
from tracelens.judges.fluency import Fluency, fluency_score
from tracelens.judges.offline import EmbeddingJudge, offline_judge
from tracelens.judges.openai import OpenAIJudge

__all__ = ["Judge", "summarize_judge_scores", "Degeneracy", "degeneracy", "Fluency", "fluency_score",
           "EmbeddingJudge", "offline_judge", "OpenAIJudge"]
