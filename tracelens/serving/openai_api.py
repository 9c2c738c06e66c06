"""The model server's OpenAI-compatible API: ``/v1/completions`` and ``/v1/chat/completions`` bodies as the request
types (`OpenAIRequest`, through the same parsers and dataclass checks as the server's own API), and results or
streamed tokens as OpenAI's answers and server-sent events (`OpenAIAPI`). What is supported is listed in
`tracelens.app.server`'s docstring; errors have OpenAI's shape (`openai_error`).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus

from tracelens.errors import RequestError
from tracelens.model.prompts import encode
from tracelens.model.requests import CaptureResult, GenerationConfig, SteeringSpec, TokenOutput, check_max_new_tokens
from tracelens.serving.parsing import bad_request, check_fields, check_max_new_tokens_limit, parse_id_rows


class OpenAIAPI:
    """The translation for one served model: ``backend`` (a `LocalBackend`: formats chats, decodes tokens), the
    ``model_id`` (requests may also name it by one of ``aliases``: the experiment's name), the ``eos_ids`` that
    end an answer, the server's ``max_new_tokens_limit`` and ``max_prompts`` and ``steering``, the server's
    parser of the extra ``steering`` field."""

    def __init__(self, backend, model_id: str, eos_ids: frozenset[int], max_new_tokens_limit: int, max_prompts: int,
                 steering: Callable[[object], list[SteeringSpec] | None], aliases: Sequence[str] = ()) -> None:
        self.backend, self.model_id, self.eos_ids = backend, model_id, eos_ids
        self.names = frozenset((model_id, *aliases))
        self.max_new_tokens_limit, self.max_prompts, self.steering = max_new_tokens_limit, max_prompts, steering

    def parse(self, body: dict, chat: bool) -> OpenAIRequest:
        return OpenAIRequest.parse(body, chat, self)

    def answer(self, r: OpenAIRequest, results: list[CaptureResult], echoed: list[Echo] | None = None) -> dict:
        """OpenAI's answer to ``r``: one choice per prompt, with usage (logprobs when asked). With ``echo``,
        ``echoed`` holds each prompt's tokens and their scores (`LocalBackend.prompt_logprobs`): the text and the
        logprobs start with the prompt's (its first token's logprob is null); ``results`` is empty when
        ``max_tokens`` is 0."""
        choices, used = [], 0
        for i in range(len(r.texts)):
            res = results[i] if results else None
            text, n, finish = self.finish(res.response_token_ids, r) if res else ("", 0, "length")
            logprobs = None if r.logprobs is None else self.logprobs_json(res, n, r.chat)
            if echoed:
                text = r.texts[i] + text
                logprobs = None if r.logprobs is None else self.echo_json(echoed[i], logprobs)
            if r.chat:
                choices.append({"index": i, "message": {"role": "assistant", "content": text},
                                "logprobs": logprobs, "finish_reason": finish})
            else:
                choices.append({"index": i, "text": text, "logprobs": logprobs, "finish_reason": finish})
            used += n
        prompt_tokens = (sum(len(e.token_ids) for e in echoed) if echoed else
                         sum(len(res.prompt_token_ids) for res in results))
        return {**r.head(self.model_id), "choices": choices,
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": used, "total_tokens": prompt_tokens + used}}

    def finish(self, ids: list[int], r: OpenAIRequest) -> tuple[str, int, str]:
        """The answer's text (cut before the first stop string), how many tokens it used, and why it ended."""
        tok = self.backend.tokenizer
        text = tok.decode(ids, skip_special_tokens=True)
        cut = stop_index(text, r.stop)
        if cut is not None:  # the tokens that start before the cut
            n = sum(len(tok.decode(ids[:i], skip_special_tokens=True)) < cut for i in range(len(ids)))
            return text[:cut], n, "stop"
        stopped = len(ids) < r.config.max_new_tokens or (ids and ids[-1] in self.eos_ids)
        return text, len(ids), "stop" if stopped else "length"

    def logprobs_json(self, res: CaptureResult | None, n: int, chat: bool) -> dict:
        """OpenAI's logprobs object of the first ``n`` response tokens (chat: ``content``; completions: the
        legacy ``tokens``/``token_logprobs``/``top_logprobs``/``text_offset``)."""
        tok = self.backend.tokenizer
        if res is None:  # echo with max_tokens 0: nothing generated
            ids, chosen, tops = [], [], []
        else:
            ids, chosen, tops = res.response_token_ids[:n], res.response_logprobs[:n], res.response_top_logprobs[:n]
        strings = [tok.decode([i]) for i in ids]
        if chat:
            def entry(i: int, lp: float) -> dict:
                s = tok.decode([i])
                return {"token": s, "logprob": lp, "bytes": list(s.encode())}
            return {"content": [{**entry(i, lp), "top_logprobs": [entry(j, l) for j, l in top]}
                                for i, lp, top in zip(ids, chosen, tops)]}
        offsets = [sum(len(s) for s in strings[:k]) for k in range(len(strings))]
        return {"tokens": strings, "token_logprobs": chosen, "text_offset": offsets,
                "top_logprobs": [_top_dict(tok, top) for top in tops]}

    def echo_json(self, echo: Echo, answer: dict) -> dict:
        """The legacy logprobs object of the prompt's tokens followed by the ``answer``'s (same form); text
        offsets count the prompt's text, special tokens (a BOS) as zero characters."""
        tok = self.backend.tokenizer
        special = set(tok.all_special_ids)
        strings = [tok.decode([i]) for i in echo.token_ids]
        lengths = [0 if i in special else len(s) for i, s in zip(echo.token_ids, strings)]
        offsets = [sum(lengths[:k]) for k in range(len(strings))]
        base = sum(lengths)
        return {"tokens": strings + answer["tokens"],
                "token_logprobs": [None, *echo.logprobs][: len(strings)] + answer["token_logprobs"],
                "text_offset": offsets + [base + o for o in answer["text_offset"]],
                "top_logprobs": [None, *(_top_dict(tok, top) for top in echo.top)][: len(strings)]
                                + answer["top_logprobs"]}

    def sse(self, r: OpenAIRequest, tokens: Iterator[TokenOutput]) -> Iterator[bytes]:
        """Server-sent events of one streamed answer: a chunk per piece of text, the finish reason in the last,
        usage when asked (``stream_options.include_usage``), then ``[DONE]``. Text within the longest stop string
        of the end is held back until it cannot start a stop string, so the pieces join to the unstreamed text."""
        tok, head = self.backend.tokenizer, r.head(self.model_id)
        ids: list[int] = []
        sent, hold = 0, max((len(s) - 1 for s in r.stop), default=0)

        def chunk(text: str | None, finish: str | None) -> bytes:
            if r.chat:
                delta = {"role": "assistant", "content": ""} if text is None else ({"content": text} if text else {})
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
            return sse_data({**head, "choices": [choice]})

        finish = None
        for t in tokens:
            if not ids and r.chat:
                yield chunk(None, None)  # the role, once the first token exists
            ids.append(t.token_id)
            text = tok.decode(ids, skip_special_tokens=True)
            cut = stop_index(text, r.stop)
            if cut is not None:
                yield chunk(text[sent:cut], "stop")
                finish = "stop"
                break
            safe = len(text) - hold - text.endswith("\ufffd")  # an unfinished UTF-8 character waits too
            if safe > sent:
                yield chunk(text[sent:safe], None)
                sent = safe
        if finish is None:
            if not ids and r.chat:
                yield chunk(None, None)
            text, _, finish = self.finish(ids, r)
            yield chunk(text[sent:], finish)
        if r.include_usage:
            prompt_tokens = len(r.token_ids[0]) if r.token_ids else len(encode(tok, r.texts[0]))
            n = self.finish(ids, r)[1]
            yield sse_data({**head, "choices": [], "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": n,
                                                              "total_tokens": prompt_tokens + n}})
        yield b"data: [DONE]\n\n"

    def chat_text(self, messages: list[dict]) -> str:
        """The model's text for chat ``messages`` (``role``, ``content``): one user turn, with an optional system
        turn first, is formatted as ``/generate`` formats a prompt; longer conversations need a chat template."""
        roles = [m["role"] for m in messages]
        contents = [m["content"] for m in messages]
        if roles == ["user"]:
            return self.backend.format(contents[0])
        if roles == ["system", "user"]:
            return self.backend.format(contents[1], contents[0])
        tok = self.backend.tokenizer
        use = self.backend.use_chat_template
        if use is False or getattr(tok, "chat_template", None) is None:
            raise RequestError(f"messages with roles {roles} need the model's chat template, and this server "
                               "formats prompts without one; send one user message (and an optional system one first)")
        try:
            return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=False)
        except Exception as err:  # jinja raises TemplateError; templates also raise ValueError/KeyError
            raise RequestError(f"the model's chat template refused these messages: {err}") from None



_OPENAI_COMMON = ("model", "max_tokens", "temperature", "top_p", "n", "stream", "stream_options", "stop", "seed",
                  "presence_penalty", "frequency_penalty", "logit_bias", "user", "steering")
MAX_TOP_LOGPROBS = 20


def openai_error(message: str, status: int, code: str | None = None) -> dict:
    """OpenAI's error body: ``type`` is ``invalid_request_error`` for 4xx, else ``server_error``."""
    kind = {401: "authentication_error", 404: "not_found_error"}.get(
        int(status), "invalid_request_error" if 400 <= status < 500 else "server_error")
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def sse_data(obj: dict) -> bytes:
    return f"data: {json.dumps(obj)}\n\n".encode()


def sse_error(message: str, status: int) -> bytes:
    return sse_data(openai_error(message, status)) + b"data: [DONE]\n\n"


def stop_index(text: str, stops: list[str]) -> int | None:
    """Where the earliest stop string starts in ``text``, or None."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None


def _top_dict(tok, top: list[tuple[int, float]]) -> dict[str, float]:
    """The legacy ``top_logprobs`` entry of one position: decoded token -> logprob, most likely first; ids that
    decode to the same text keep the likelier one's logprob."""
    out: dict[str, float] = {}
    for token_id, logprob in top:
        out.setdefault(tok.decode([token_id]), logprob)
    return out


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _only(body: dict, name: str, allowed: tuple, why: str) -> None:
    if body.get(name) not in allowed:
        raise RequestError(f"{name} must be {' or '.join(map(json.dumps, allowed))} ({why}); got {body[name]!r}")


@dataclass(frozen=True)
class Echo:
    """A prompt as ``echo`` returns it: its ``token_ids``, the ``logprobs`` of every token after the first and
    their ``top`` alternatives (`LocalBackend.prompt_logprobs`)."""

    token_ids: list[int]
    logprobs: list[float]
    top: list[list[tuple[int, float]]]


@dataclass
class OpenAIRequest:
    """A parsed ``/v1/completions`` or ``/v1/chat/completions`` body (``texts``: the model's text per choice;
    ``token_ids``: a completion's prompts sent as token ids, used as given, ``texts`` then their decoded text)."""

    chat: bool
    texts: list[str]
    config: GenerationConfig
    steering: list[SteeringSpec] | None
    stop: list[str]
    logprobs: int | None  # top alternatives per token; None: no logprobs
    stream: bool
    include_usage: bool
    echo: bool = False  # completions: the prompt's text (and logprobs) lead the answer
    generate: bool = True  # False: echo with max_tokens 0, the prompt scored only
    token_ids: list[list[int]] | None = None
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: int = field(default_factory=lambda: int(time.time()))

    def head(self, model: str) -> dict:
        kind = ("chatcmpl", "chat.completion") if self.chat else ("cmpl", "text_completion")
        obj = kind[1] + (".chunk" if self.stream and self.chat else "")
        return {"id": f"{kind[0]}-{self.id}", "object": obj, "created": self.created, "model": model}

    @classmethod
    def parse(cls, body: dict, chat: bool, app: OpenAIAPI) -> OpenAIRequest:
        if chat:
            check_fields(body, ("model", "messages"), _OPENAI_COMMON + ("max_completion_tokens", "logprobs", "top_logprobs"))
        else:
            check_fields(body, ("model", "prompt"), _OPENAI_COMMON + ("logprobs", "echo", "suffix", "best_of"))
        if body["model"] not in app.names:
            raise RequestError(f"model {body['model']!r} is not served here; this server serves {app.model_id!r} "
                               "(GET /v1/models)", HTTPStatus.NOT_FOUND, "model_not_found")
        for name, allowed, why in (("n", (None, 1), "one choice per request"),
                                   ("top_p", (None, 1, 1.0), "nucleus sampling is not supported"),
                                   ("presence_penalty", (None, 0, 0.0), "penalties are not supported"),
                                   ("frequency_penalty", (None, 0, 0.0), "penalties are not supported"),
                                   ("best_of", (None, 1), "one candidate per prompt"),
                                   ("suffix", (None,), "insertion is not supported")):
            if name in body:
                _only(body, name, allowed, why)
        if body.get("logit_bias") not in (None, {}):
            raise RequestError(f"logit_bias must be null or {{}} (biasing is not supported); got {body['logit_bias']!r}")
        if body.get("user") is not None and not isinstance(body["user"], str):
            raise RequestError(f"user must be a string; got {body['user']!r}")
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise RequestError(f"stream must be true or false; got {stream!r}")
        options = body.get("stream_options")
        if options is not None and (not stream or not isinstance(options, dict) or set(options) - {"include_usage"}
                                    or not isinstance(options.get("include_usage", False), bool)):
            raise RequestError(f"stream_options must be {{include_usage: bool}} with stream=true; got {options!r}")
        stop = body.get("stop")
        stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or not 0 <= len(stop) <= 4 or not all(isinstance(s, str) and s for s in stop):
            raise RequestError(f"stop must be a non-empty string or a list of up to 4 of them; got {body['stop']!r}")
        logprobs = cls._logprobs(body, chat)
        if stream and logprobs is not None:
            raise RequestError("logprobs with stream=true is not supported; ask without streaming")
        echo = False if body.get("echo") is None else body["echo"]
        if not isinstance(echo, bool):
            raise RequestError(f"echo must be true or false; got {body['echo']!r}")
        if echo and stream:
            raise RequestError("echo with stream=true is not supported; ask without streaming")
        token_ids = None if chat else cls._token_prompts(body["prompt"], app)
        if chat:
            texts = cls._chat_texts(body["messages"], app)
        elif token_ids is not None:
            texts = [app.backend.tokenizer.decode(ids) for ids in token_ids]
        else:
            texts = cls._prompts(body["prompt"], app.max_prompts)
        if stream and len(texts) != 1:
            raise RequestError(f"stream=true takes one prompt; got {len(texts)}")
        generate = not (echo and body.get("max_tokens") == 0)  # echo alone: the prompt scored, nothing generated
        config = cls._config({**body, "max_tokens": None} if not generate else body, chat, app.max_new_tokens_limit)
        return cls(chat, texts, config, app.steering(body.get("steering")), stop, logprobs, stream,
                   bool((options or {}).get("include_usage", False)), echo, generate, token_ids=token_ids)

    @staticmethod
    def _config(body: dict, chat: bool, limit: int) -> GenerationConfig:
        """``max_tokens`` (chat: or ``max_completion_tokens``) in [1, ``limit``], ``temperature`` in [0, 2]
        (OpenAI's range; default 1), ``seed``: `GenerationConfig`'s checks plus these bounds."""
        name = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
        n = body.get(name)
        if n is None:  # OpenAI's default for completions; for chat, the server's own default
            n = min(16 if not chat else GenerationConfig.max_new_tokens, limit)
        with bad_request(name):
            check_max_new_tokens(n)
        check_max_new_tokens_limit(n, limit, name)
        temperature = body.get("temperature")
        with bad_request():
            config = GenerationConfig(n, 1.0 if temperature is None else temperature, None, body.get("seed"))
        if config.temperature > 2:
            raise RequestError(f"temperature must be a number in [0, 2]; got {temperature!r}")
        return config

    @staticmethod
    def _logprobs(body: dict, chat: bool) -> int | None:
        if chat:
            wanted, top = body.get("logprobs"), body.get("top_logprobs")
            if wanted not in (None, True, False):
                raise RequestError(f"logprobs must be true or false; got {wanted!r}")
            if top is not None and (not _is_int(top) or not 0 <= top <= MAX_TOP_LOGPROBS):
                raise RequestError(f"top_logprobs must be an integer in [0, {MAX_TOP_LOGPROBS}]; got {top!r}")
            if top is not None and not wanted:
                raise RequestError("top_logprobs needs logprobs=true")
            return (top or 0) if wanted else None
        n = body.get("logprobs")
        if n is not None and (not _is_int(n) or not 0 <= n <= MAX_TOP_LOGPROBS):
            raise RequestError(f"logprobs must be an integer in [0, {MAX_TOP_LOGPROBS}] or null; got {n!r}")
        return n

    @staticmethod
    def _prompts(prompt, limit: int) -> list[str]:
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if (not isinstance(prompts, list) or not 1 <= len(prompts) <= limit
                or not all(isinstance(p, str) for p in prompts)):
            raise RequestError(f"prompt must be a string, a list of 1 to {limit} strings, a list of token ids or a "
                               f"list of 1 to {limit} token-id lists; got {json.dumps(prompt)[:80]}")
        return prompts

    @staticmethod
    def _token_prompts(prompt, app: OpenAIAPI) -> list[list[int]] | None:
        """Token-id prompts (OpenAI's list of ids, or list of id lists), checked; None for text prompts."""
        if not isinstance(prompt, list) or not prompt or isinstance(prompt[0], str):
            return None
        rows = [prompt] if _is_int(prompt[0]) else prompt
        return parse_id_rows(rows, "prompt", getattr(app.backend.model.cfg, "d_vocab", None), app.max_prompts)

    @staticmethod
    def _chat_texts(messages, app: OpenAIAPI) -> list[str]:
        if not isinstance(messages, list) or not messages:
            raise RequestError("messages must be a non-empty list of {role, content}")
        turns = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or "content" not in m:
                raise RequestError(f"messages[{i}] must be an object with role and content")
            unknown = sorted(set(m) - {"role", "content", "name"})
            if unknown:
                raise RequestError(f"messages[{i}]: unknown field(s): {', '.join(unknown)}; allowed: role, content, name")
            role = {"developer": "system"}.get(m["role"], m["role"])
            if role not in ("system", "user", "assistant"):
                raise RequestError(f"messages[{i}].role must be system, developer, user or assistant; got {m['role']!r}")
            content = m["content"]
            if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                                 and isinstance(p.get("text"), str) for p in content):
                content = "".join(p["text"] for p in content)
            if not isinstance(content, str):
                raise RequestError(f"messages[{i}].content must be a string or a list of text parts")
            turns.append({"role": role, "content": content})
        return [app.chat_text(turns)]
