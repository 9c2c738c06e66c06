"""Teacher-forced log-likelihood of given responses: exact, judge-free, no sampling.

`response_logprobs` runs prompt + response through the model (left-padded batches) under whatever
hooks are active, e.g. inside a `SteeringHook`, and returns the log-probability of every response
token given everything before it. Batched results equal one sequence at a time (to float tolerance).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from tracelens.errors import ShapeError
from tracelens.model.prompts import left_pad


def response_logprobs(model, prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]],
                      batch_size: int = 8, distributions: bool = False
                      ) -> list[Float[Tensor, " n"]] | tuple[list[Float[Tensor, " n"]], list[Float[Tensor, "n vocab"]]]:
    """Per row, `log p(response[k] | prompt, response[:k])` for each response token, float32 on CPU.

    With `distributions`, also each row's full next-token log-distributions `[n_response_tokens, vocab]`
    at those positions (for KL divergences; memory grows with vocab). Prompts and responses are token
    ids; every prompt and every response needs at least one token (ValueError naming the row).
    """
    if len(prompts) != len(responses):
        raise ShapeError(f"got {len(prompts)} prompts but {len(responses)} responses")
    for i, (p, r) in enumerate(zip(prompts, responses)):
        if not len(p) or not len(r):
            raise ShapeError(f"row {i} needs at least one prompt token and one response token; "
                             f"got {len(p)} and {len(r)}")
    pad_id = getattr(model.tokenizer, "pad_token_id", None) or 0
    device = model.cfg.device
    logprobs, dists = [], []
    rows = [list(p) + list(r) for p, r in zip(prompts, responses)]
    for start in tqdm(range(0, len(rows), batch_size), desc="teacher forcing", disable=len(rows) <= batch_size):
        chunk = rows[start : start + batch_size]
        ids, mask = left_pad(chunk, pad_id)
        with torch.inference_mode():
            logits = model(ids.to(device), attention_mask=mask.to(device))
        width = ids.shape[1]
        for i, row in enumerate(chunk):
            n = len(responses[start + i])
            # Logits at position t predict token t + 1: the response's tokens are the row's last n.
            pred = logits[i, width - n - 1 : width - 1].float().log_softmax(-1).cpu()
            target = torch.as_tensor(row[-n:])
            logprobs.append(pred.gather(-1, target[:, None])[:, 0])
            if distributions:
                dists.append(pred)
    return (logprobs, dists) if distributions else logprobs
