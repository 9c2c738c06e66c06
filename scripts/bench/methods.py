"""Planted-direction benchmark for the extraction methods (pure tensors, CPU, a few minutes).

Synthetic "residual stream" rows: a shared mean offset, anisotropic Gaussian noise (power-law spectrum in a random
basis), a planted unit direction u that shifts the two classes apart by a small margin, and optionally a few
massive dimensions (100-1000x the median |activation|) that carry no class signal. Each method is fitted on the
training rows and scored on held-out rows: cosine to u, AUROC, accuracy (threshold: midpoint of the training
projection means) and fit time. Prints a markdown table of mean +- std over seeds.

    python scripts/bench/methods.py --seeds 0 1 2 --widths 576 2304
"""

from __future__ import annotations

import argparse
import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from tracelens.math import cosine_similarity, projection
from tracelens.methods import PreCleanedMethod, get_method
from tracelens.metrics import accuracy, auroc

MASSIVE_SCALES = (100.0, 300.0, 600.0, 1000.0)
"""Massive dims' typical values, in multiples of the median |activation| of the clean data."""


@dataclass(frozen=True)
class Data:
    """Train/test activations of both classes, the planted direction and the massive dims (empty if none)."""

    train_pos: Tensor
    train_neg: Tensor
    test_pos: Tensor
    test_neg: Tensor
    planted: Tensor
    massive_dims: list[int]


def make_data(args: argparse.Namespace, width: int, seed: int, massive: bool) -> Data:
    """Draw one data set; the same seed gives the same rows with and without the massive dims."""
    g = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(width, width, generator=g, dtype=torch.float64))
    spectrum = torch.arange(1, width + 1, dtype=torch.float64) ** -args.alpha
    spectrum *= width / spectrum.sum()  # mean per-dim noise variance 1
    planted = basis[:, args.planted_rank - 1]
    margin = args.dprime * spectrum[args.planted_rank - 1].sqrt()  # class-mean distance along u
    offset = torch.randn(width, generator=g, dtype=torch.float64)
    n = args.n_train + args.n_test

    def rows(sign: float) -> Tensor:
        noise = (torch.randn(n, width, generator=g, dtype=torch.float64) * spectrum.sqrt()) @ basis.T
        return offset + noise + sign * margin / 2 * planted

    pos, neg = rows(1.0), rows(-1.0)
    dims = torch.randperm(width, generator=g)[: args.n_massive].tolist()
    if massive:
        median = torch.cat([pos, neg]).abs().median()
        for dim, scale in zip(dims, MASSIVE_SCALES * (args.n_massive // len(MASSIVE_SCALES) + 1)):
            for acts in (pos, neg):  # class-independent: value = scale * median * (1 +- 10% jitter)
                acts[:, dim] += scale * median * (1 + 0.1 * torch.randn(n, generator=g, dtype=torch.float64))
    split = args.n_train
    return Data(
        pos[:split].float(), neg[:split].float(), pos[split:].float(), neg[split:].float(),
        planted.float(), dims if massive else [],
    )  # fmt: skip


def evaluate(method, data: Data, seed: int, kwargs: dict) -> dict[str, float]:
    """Fit on the training rows (with ``seed`` where the method takes one) and score on the held-out rows."""
    if method.name.split("[")[0] in ("gradient", "fisher", "random_baseline", "rfm"):
        kwargs = {**kwargs, "seed": seed}
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        vector = method.extract(data.train_pos, data.train_neg, **kwargs)["vector"]
    seconds = time.perf_counter() - start
    threshold = float((projection(data.train_pos, vector).mean() + projection(data.train_neg, vector).mean()) / 2)
    test_pos, test_neg = projection(data.test_pos, vector), projection(data.test_neg, vector)
    return {
        "cos": float(cosine_similarity(vector, data.planted)),
        "auroc": auroc(test_pos, test_neg),
        "acc": accuracy(test_pos, test_neg, threshold=threshold),
        "seconds": seconds,
    }


def bayes_auroc(dprime: float) -> float:
    """AUROC of the optimal rule for two Gaussians d' apart: Phi(d' / sqrt 2)."""
    return float(0.5 * (1 + torch.erf(torch.tensor(dprime / 2))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--widths", type=int, nargs="+", default=[576, 2304])
    parser.add_argument("--methods", nargs="+", default=["mean_diff", "probe", "gradient", "fisher", "rfm", "random_baseline"])
    parser.add_argument("--n-train", type=int, default=200, help="training rows per class")
    parser.add_argument("--n-test", type=int, default=100, help="held-out rows per class")
    parser.add_argument("--dprime", type=float, default=3.0, help="class margin in noise stds along u")
    parser.add_argument("--planted-rank", type=int, default=10, help="u is the noise eigenvector of this rank")
    parser.add_argument("--alpha", type=float, default=1.0, help="noise spectrum: variance of rank i ~ i^-alpha")
    parser.add_argument("--n-massive", type=int, default=4, help="massive dims in the 'massive' setting")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 avoids oversubscribing a shared CPU)")
    parser.add_argument("--rfm-reg", type=float, default=None, help="rfm kernel ridge (default: the method's)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    print(
        f"torch threads: {args.threads}. Data: {args.n_train} train + {args.n_test} held-out rows per class; seeds {args.seeds}. Noise: Gaussian, "
        f"variance of rank i ~ i^-{args.alpha} in a random orthonormal basis, mean per-dim variance 1, plus a shared "
        f"N(0, I) offset. Planted u = noise eigenvector of rank {args.planted_rank}; classes at +-margin/2 along u "
        f"with margin = {args.dprime} noise stds along u (Bayes AUROC {bayes_auroc(args.dprime):.3f}). "
        f"'massive': {args.n_massive} random dims get +{'/'.join(f'{s:g}' for s in MASSIVE_SCALES)}x the median "
        "|activation| (10% per-row jitter, no class signal); '+clean' = PreCleanedMethod with those dims.\n"
    )
    for width in args.widths:
        lam = torch.arange(1, width + 1, dtype=torch.float64) ** -args.alpha
        lam *= width / lam.sum()
        margin = args.dprime * float(lam[args.planted_rank - 1].sqrt())
        print(
            f"width {width}: variance along u {float(lam[args.planted_rank - 1]):.1f}x the mean per-dim variance; "
            f"margin {margin:.2f} vs mean row noise norm {width**0.5:.1f} ({margin / width**0.5:.1%})"
        )
    print()
    print("| width | setting | method | cos to planted | held-out AUROC | held-out acc | fit s |")
    print("|---|---|---|---|---|---|---|")
    for width in args.widths:
        for setting in ("clean", "massive"):
            results: dict[str, list[dict[str, float]]] = {}
            for seed in args.seeds:
                data = make_data(args, width, seed, massive=setting == "massive")
                for name in args.methods:
                    variants = [(name, get_method(name))]
                    if setting == "massive" and name != "random_baseline":
                        variants.append((f"{name}+clean", PreCleanedMethod(get_method(name), data.massive_dims)))
                    for label, method in variants:
                        kwargs = {"reg": args.rfm_reg} if name == "rfm" and args.rfm_reg is not None else {}
                        results.setdefault(label, []).append(evaluate(method, data, seed, kwargs))
            for label, runs in results.items():
                cells = [
                    f"{np.mean([r[key] for r in runs]):.3f} ± {np.std([r[key] for r in runs]):.3f}"
                    for key in ("cos", "auroc", "acc")
                ]
                print(f"| {width} | {setting} | {label} | {' | '.join(cells)} | {np.mean([r['seconds'] for r in runs]):.2f} |")


if __name__ == "__main__":
    main()
