"""Every public name resolves, and the seed's import paths work."""

import tracelens


def test_every_name_in_all_resolves_and_is_unique():
    assert len(set(tracelens.__all__)) == len(tracelens.__all__)
    for name in tracelens.__all__:
        assert getattr(tracelens, name) is not None, name


def test_the_seeds_core_math_helpers_import_from_tracelens_math():
    from tracelens.math import (  # noqa: F401
        compute_top_pcs_by_variance,
        denoise_with_pcs,
        grand_mean_center,
        pca_norm_correlation,
        representational_similarity,
        trait_clusters,
        vector_set_comparison,
    )


def test_the_seeds_metrics_import_from_math_as_from_core_math():
    import tracelens.math
    import tracelens.metrics

    for name in ("accuracy", "effect_size", "polarity_correct", "pearson_correlation", "auroc"):
        assert getattr(tracelens.math, name) is getattr(tracelens.metrics, name)


def test_the_seeds_remaining_names():
    from tracelens import generate_batch  # noqa: F401  (seed: utils.model_generation)
    from tracelens.types import ModelConfig, SteeringEntry  # noqa: F401  (seed: core.types)


def test_the_readme_lists_exactly_the_tested_architectures():
    import re
    from pathlib import Path

    from tracelens.testing import ARCHITECTURE_NAMES, ARCHITECTURES

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    listed = re.search(r"<!-- tested-architectures -->(.*?)<!-- /tested-architectures -->", readme).group(1)
    assert listed == ", ".join(ARCHITECTURE_NAMES[a] for a in ARCHITECTURES)
    assert set(ARCHITECTURE_NAMES) == set(ARCHITECTURES)


def test_the_package_and_every_module_import_in_a_plain_interpreter():
    """Without pytest's import hook: a fresh `python` imports tracelens and then each of its modules."""
    import subprocess
    import sys

    code = ("import importlib, pkgutil, tracelens\n"
            "for m in pkgutil.walk_packages(tracelens.__path__, 'tracelens.'):\n"
            "    importlib.import_module(m.name)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]


def test_every_exported_name_resolves_to_the_object_its_module_defines():
    import importlib

    for name, module in tracelens._MODULE_OF.items():
        assert getattr(tracelens, name) is getattr(importlib.import_module(module), name), name
    assert set(tracelens.__all__) <= set(tracelens._MODULE_OF) <= set(dir(tracelens))


def test_import_tracelens_loads_no_model_server_dashboard_or_vllm_code():
    """Names load on first use: a fresh interpreter's `import tracelens` imports none of torch, TransformerLens,
    the server, the dashboard or vLLM; asking for a name loads only what it needs."""
    import subprocess
    import sys

    heavy = ["torch", "transformer_lens", "vllm", "tracelens.app.server", "tracelens.app.dashboard"]
    code = ("import sys, tracelens\n"
            f"print([m for m in {heavy!r} if m in sys.modules])\n"
            "tracelens.VectorSpec\n"
            f"print([m for m in {heavy!r} if m in sys.modules])\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines() == ["[]", "[]"]
    import pytest

    with pytest.raises(AttributeError, match="module 'tracelens' has no attribute 'nothing'"):
        tracelens.nothing
