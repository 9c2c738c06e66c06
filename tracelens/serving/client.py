"""`RemoteBackend`: the `LocalBackend` interface over a running `tracelens.app.server.ModelServer`, and
`get_backend`, which prefers such a server for the experiment and falls back to loading the model here.

It honours `tracelens.serving.protocol.Backend` in full, so monitoring and the steering evaluation run on a
served model. Requests and results are the types of `tracelens.model.requests` (`GenerationConfig`,
`SteeringSpec`, `CaptureSpec`; `CaptureResult`, `TokenOutput`, `ResponseLogprobs`, `{layer: {component: tensor}}`),
sent in the wire format of `tracelens.serving.codec`; tensors come back on the CPU. `model` and `tokenizer` are
not available remotely.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from tracelens.errors import ServerError
from tracelens.model.requests import (
    CaptureResult,
    CaptureSpec,
    GenerationConfig,
    ResponseLogprobs,
    SteeringSpec,
    TokenOutput,
)
from tracelens.serving.backends import LocalBackend
from tracelens.serving.prompting import check_prompts
from tracelens.serving.protocol import DEFAULT_PORT, TOKEN_ENV
from tracelens.serving.codec import (
    capture_to_json,
    config_to_json,
    decode_activations,
    encode_tensor,
    result_from_json,
    steering_to_json,
    token_from_json,
)


class RemoteBackend:
    """Generation, capture and steering on a model served by `tracelens.app.server.ModelServer` at ``url``."""

    def __init__(self, url: str, token: str | None = None, timeout: float | None = None) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = timeout
        self._health: dict | None = None

    # --- transport ---

    def _request(self, path: str, body: dict | None = None, timeout: float | None = None):
        data = None if body is None else json.dumps(body, allow_nan=False).encode()
        headers = {"Content-Type": "application/json"} if data is not None else {}
        if self.token is not None:
            headers["Authorization"] = f"Bearer {self.token}"
        req = urllib.request.Request(self.url + path, data=data, headers=headers, method="GET" if body is None else "POST")
        try:
            return urllib.request.urlopen(req, timeout=timeout if timeout is not None else self.timeout)
        except urllib.error.HTTPError as err:
            try:
                message = json.loads(err.read()).get("error", err.reason)
            except (ValueError, AttributeError):
                message = str(err.reason)
            finally:
                err.close()
            raise ServerError(err.code, message) from None

    def _call(self, path: str, body: dict | None = None, timeout: float | None = None) -> dict:
        with self._request(path, body, timeout) as resp:
            return json.loads(resp.read())

    def health(self, timeout: float | None = None) -> dict:
        self._health = self._call("/health", timeout=timeout)
        return self._health

    def _info(self) -> dict:
        return self._health if self._health is not None else self.health()

    # --- properties ---

    @property
    def experiment(self) -> str:
        return self._info()["experiment"]

    @property
    def n_layers(self) -> int:
        return self._info()["model"]["n_layers"]

    @property
    def hidden_dim(self) -> int:
        return self._info()["model"]["hidden_dim"]

    @property
    def model_name(self) -> str | None:
        return self._info()["model"]["name"]

    @property
    def device(self) -> torch.device:
        """Where returned tensors live (always the CPU; the server's own device is in ``health()``)."""
        return torch.device("cpu")

    @property
    def model(self):
        raise AttributeError("RemoteBackend has no local model; use LocalBackend for hooks on the model")

    @property
    def tokenizer(self):
        raise AttributeError("RemoteBackend has no local tokenizer; use LocalBackend or load the tokenizer yourself")

    # --- generation ---

    @staticmethod
    def _prompts_body(prompts, system_prompts) -> dict:
        """``{prompts, system_prompts?}`` (the server formats them; `check_prompts` refuses one string here)."""
        body = {"prompts": check_prompts(prompts)}
        if system_prompts is not None:
            body["system_prompts"] = list(system_prompts)
        return body

    def _gen_body(self, prompts, config, steering, system_prompts) -> dict:
        return {**self._prompts_body(prompts, system_prompts), "config": config_to_json(config),
                "steering": steering_to_json(steering)}

    def generate(self, prompts: Sequence[str], config: GenerationConfig | None = None,
                 steering: Sequence[SteeringSpec] | None = None,
                 system_prompts: Sequence[str | None] | None = None) -> list[str]:
        return self._call("/generate", self._gen_body(prompts, config, steering, system_prompts))["responses"]

    def generate_results(self, prompts: Sequence[str], config: GenerationConfig | None = None,
                         steering: Sequence[SteeringSpec] | None = None,
                         system_prompts: Sequence[str | None] | None = None) -> list[CaptureResult]:
        out = self._call("/generate", self._gen_body(prompts, config, steering, system_prompts))
        return [result_from_json(r) for r in out["results"]]

    def generate_with_capture(self, prompts: Sequence[str], config: GenerationConfig | None = None,
                              capture: CaptureSpec | None = None,
                              steering: Sequence[SteeringSpec] | None = None,
                              system_prompts: Sequence[str | None] | None = None) -> list[CaptureResult]:
        body = self._gen_body(prompts, config, steering, system_prompts)
        body["capture"] = capture_to_json(capture or CaptureSpec())
        return [result_from_json(r) for r in self._call("/generate_with_capture", body)["results"]]

    def stream(self, prompt: str, config: GenerationConfig | None = None, capture: CaptureSpec | None = None,
               steering: Sequence[SteeringSpec] | None = None) -> Iterator[TokenOutput]:
        """Tokens as the server generates them (JSON lines); a mid-stream server failure raises ServerError with
        the status the server gives it (503 for a passed deadline)."""
        body = {"prompt": prompt, "config": config_to_json(config), "capture": capture_to_json(capture),
                "steering": steering_to_json(steering)}
        with self._request("/stream", body) as resp:
            for line in resp:
                if not line.strip():
                    continue
                item = json.loads(line)
                if "error" in item:
                    raise ServerError(item.get("status", 500), item["error"])
                yield token_from_json(item)

    def prompt_token_ids(self, prompts: Sequence[str],
                         system_prompts: Sequence[str | None] | None = None) -> list[list[int]]:
        return self._call("/prompt_token_ids", self._prompts_body(prompts, system_prompts))["token_ids"]

    def token_texts(self, token_ids: Sequence[int]) -> list[str]:
        return self._call("/token_texts", {"token_ids": [int(i) for i in token_ids]})["tokens"]

    def text_token_ids(self, texts: Sequence[str]) -> list[list[int]]:
        return self._call("/text_token_ids", {"texts": check_prompts(texts)})["token_ids"]

    def response_logprobs(self, prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]],
                          steering: Sequence[SteeringSpec] | None = None, *, kl: bool = False) -> ResponseLogprobs:
        body = {"prompt_ids": [[int(i) for i in row] for row in prompt_ids],
                "response_ids": [[int(i) for i in row] for row in response_ids],
                "steering": steering_to_json(steering), "kl": kl}
        out = self._call("/response_logprobs", body)
        return ResponseLogprobs([torch.tensor(row, dtype=torch.float32) for row in out["logprobs"]],
                                None if out["kl"] is None else [torch.tensor(r, dtype=torch.float32) for r in out["kl"]])

    def forward_with_capture(self, input_ids: Tensor, attention_mask: Tensor | None,
                             capture: CaptureSpec) -> dict[int, dict[str, Tensor]]:
        body = {"input_ids": encode_tensor(torch.as_tensor(input_ids)),
                "attention_mask": None if attention_mask is None else encode_tensor(torch.as_tensor(attention_mask)),
                "capture": capture_to_json(capture)}
        return decode_activations(self._call("/forward_with_capture", body)["activations"])


def get_backend(experiment: str, prefer_server: bool = True, port: int = DEFAULT_PORT, variant: str | None = None,
                *, token: str | None = None, timeout: float = 0.5, **local_kwargs) -> RemoteBackend | LocalBackend:
    """A `RemoteBackend` when a model server for ``experiment`` (and ``variant``, if given) answers ``/health`` on
    127.0.0.1:``port`` within ``timeout`` seconds, else ``LocalBackend.from_experiment(experiment, variant,
    **local_kwargs)``. ``token`` defaults to ``$TRACELENS_SERVER_TOKEN``."""
    if prefer_server:
        remote = RemoteBackend(f"http://127.0.0.1:{port}", token if token is not None else os.environ.get(TOKEN_ENV))
        try:
            info = remote.health(timeout=timeout)
        except (OSError, ServerError, ValueError):
            info = None
        if (isinstance(info, dict) and info.get("status") == "ok" and info.get("experiment") == experiment
                and (variant is None or info.get("variant") == variant)):
            return remote
    return LocalBackend.from_experiment(experiment, variant, **local_kwargs)
