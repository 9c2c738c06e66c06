"""Vector interchange with llama.cpp, steering-vectors, repeng and hidden-state tensors.

tracelens keys a vector by layer L, added at `blocks.L.hook_resid_post`: the output of decoder block L,
HF `hidden_states[L + 1]`. The other formats, read from their own source:

| format | key K | applied / read at | tracelens layer |
|---|---|---|---|
| llama.cpp GGUF `direction.K` | `common_control_vector_load_one` puts it in `tensors[K]`; `build_cvec(cur, il)` adds it to `l_out` of block `il` (0-based) | output of block K | L = K (K = 0 is rejected by llama.cpp) |
| repeng `ControlVector.directions[K]` | `ControlModel` wraps `model.layers[K]` and adds to its output; trained from `hidden_states[K + 1]` | output of block K | L = K |
| steering-vectors `layer_activations[K]`, `layer_type="decoder_block"` | forward hook on `model.layers[K]` | output of block K | L = K |
| `[n_layers + 1, d]` tensor (persona-vector `.pt`) row R | `hidden_states[R]`; row 0 is the embeddings | output of block R - 1 | L = R - 1 (row 0 dropped) |

For the last layer HF `hidden_states[-1]` is after the final norm while `blocks.{n-1}.hook_resid_post` is
before it: a last row measured from `hidden_states` was taken after the norm.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from tracelens.model import edits
from tracelens.errors import ConfigError, DataError, ShapeError

FORMATS = ("gguf", "steering_vectors", "repeng", "hidden_states")
GGUF_ARCH = "controlvector"
Vectors = Mapping[int, Float[Tensor, " d"]]


def export_vector(vectors: Vectors, fmt: str, path: str | Path | None = None, *, model_hint: str = "",
                  n_layers: int | None = None, cls=None):
    """Write or build `vectors` (`{tracelens layer: [d]}`) in format `fmt`, mapping layers as in the module table.

    - "gguf": writes a llama.cpp control vector to `path` (F32 `direction.K`, `controlvector.model_hint`,
      `controlvector.layer_count`); returns the path.
    - "steering_vectors": returns a `steering_vectors.SteeringVector` (decoder_block).
    - "repeng": returns `cls(model_type=model_hint, directions={K: float32 ndarray})`, `cls` defaulting to
      `repeng.ControlVector`.
    - "hidden_states": returns a `[n_layers + 1, d]` tensor (row 0 and unset layers zero); with `path`,
      also `torch.save`s it there.
    """
    checked = _check_vectors(vectors)
    if fmt == "gguf":
        if path is None:
            raise ConfigError("export_vector(..., 'gguf') needs a path to write to")
        return _write_gguf(checked, Path(path), model_hint)
    if fmt == "steering_vectors":
        from steering_vectors import SteeringVector

        return SteeringVector(layer_activations=dict(checked), layer_type="decoder_block")
    if fmt == "repeng":
        if cls is None:
            try:
                from repeng import ControlVector as cls
            except ImportError as err:
                raise ImportError("exporting to repeng needs repeng installed, or pass cls= a class with "
                                  "fields (model_type, directions)") from err
        return cls(model_type=model_hint, directions={k: v.numpy().astype(np.float32) for k, v in checked.items()})
    if fmt == "hidden_states":
        if n_layers is None:
            raise ConfigError("export_vector(..., 'hidden_states') needs n_layers (the model's number of blocks)")
        too_deep = [k for k in checked if k >= n_layers]
        if too_deep:
            raise ConfigError(f"layers {too_deep} do not exist in a model with n_layers={n_layers}")
        width = next(iter(checked.values())).shape[0]
        out = torch.zeros(n_layers + 1, width)
        for layer, v in checked.items():
            out[layer + 1] = v
        if path is not None:
            torch.save(out, path)
        return out
    raise ConfigError(f"unknown vector format {fmt!r}; use one of {FORMATS}")


def import_vector(source, fmt: str | None = None) -> dict[int, Float[Tensor, " d"]]:
    """`{tracelens layer: float32 [d]}` from a GGUF file, a `.pt` hidden-state tensor file, a `SteeringVector`,
    a repeng `ControlVector` (anything with `model_type` and `directions`) or a `[n_layers + 1, d]` tensor.
    `fmt` (one of FORMATS) is guessed from the file suffix or the object when None. All-zero rows of a
    hidden-state tensor are skipped (they steer nothing)."""
    fmt = fmt or _guess_format(source)
    if fmt == "gguf":
        return _read_gguf(Path(source))
    if fmt == "steering_vectors":
        if getattr(source, "layer_type", None) != "decoder_block":
            raise ConfigError(f"only decoder_block steering vectors map to the residual stream; got layer_type "
                             f"{getattr(source, 'layer_type', None)!r}")
        return _check_vectors(source.layer_activations)
    if fmt == "repeng":
        return _check_vectors({k: torch.as_tensor(np.asarray(v)) for k, v in source.directions.items()})
    if fmt == "hidden_states":
        t = torch.load(source, weights_only=True) if isinstance(source, (str, Path)) else source
        if not isinstance(t, Tensor) or t.dim() != 2 or t.shape[0] < 2:
            raise ShapeError(f"a hidden-state vector must be a [n_layers + 1, d] tensor; got "
                             f"{tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__}")
        return _check_vectors({r - 1: t[r] for r in range(1, t.shape[0]) if t[r].any()})
    raise ConfigError(f"unknown vector format {fmt!r}; use one of {FORMATS}")


def _guess_format(source) -> str:
    if isinstance(source, (str, Path)):
        suffix = Path(source).suffix
        if suffix in (".gguf", ".pt"):
            return "gguf" if suffix == ".gguf" else "hidden_states"
        raise ConfigError(f"cannot tell the format of {source!r} from its suffix; pass fmt= one of {FORMATS}")
    if isinstance(source, Tensor):
        return "hidden_states"
    if hasattr(source, "layer_activations"):
        return "steering_vectors"
    if hasattr(source, "directions") and hasattr(source, "model_type"):
        return "repeng"
    raise ConfigError(f"cannot tell the vector format of a {type(source).__name__}; pass fmt= one of {FORMATS}")


def _check_vectors(vectors: Vectors) -> dict[int, Tensor]:
    if not isinstance(vectors, Mapping) or not vectors:
        raise ConfigError("vectors must be a non-empty {layer: [d] tensor} mapping")
    out = {}
    for layer, v in sorted(vectors.items()):
        if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
            raise ConfigError(f"vector layers must be non-negative ints; got {layer!r}")
        out[layer] = edits.as_vector(torch.as_tensor(v), f"vector of layer {layer}").cpu().clone()
    widths = {v.shape[0] for v in out.values()}
    if len(widths) > 1:
        raise ShapeError(f"vectors of different widths {sorted(widths)}: they cannot come from one model")
    return out


def _write_gguf(vectors: dict[int, Tensor], path: Path, model_hint: str) -> Path:
    import gguf

    from tracelens.io import _replacing

    if 0 in vectors:
        raise ConfigError("llama.cpp rejects a control vector for layer 0 ('invalid (zero) direction tensor layer "
                         "index'); drop layer 0 before exporting to GGUF")
    with _replacing(path) as tmp:
        writer = gguf.GGUFWriter(tmp, GGUF_ARCH)
        writer.add_string(f"{GGUF_ARCH}.model_hint", model_hint)
        writer.add_uint32(f"{GGUF_ARCH}.layer_count", len(vectors))
        for layer, v in vectors.items():
            writer.add_tensor(f"direction.{layer}", v.numpy().astype(np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return path


def _read_gguf(path: Path) -> dict[int, Tensor]:
    import gguf

    reader = gguf.GGUFReader(path)
    arch = reader.get_field("general.architecture")
    if arch is None or arch.contents() != GGUF_ARCH:
        raise DataError(f"{path} is not a control vector (general.architecture "
                         f"{None if arch is None else arch.contents()!r}, expected {GGUF_ARCH!r})")
    out = {}
    for tensor in reader.tensors:
        prefix, _, index = tensor.name.partition(".")
        if prefix != "direction" or not index.isdigit():
            raise DataError(f"{path}: unexpected tensor {tensor.name!r}; control vectors hold direction.K tensors")
        if tensor.tensor_type != gguf.GGMLQuantizationType.F32 or len(tensor.shape) != 1:
            raise DataError(f"{path}: {tensor.name} must be a 1-D F32 tensor; got {tensor.tensor_type.name} "
                             f"of shape {tuple(tensor.shape)}")
        out[int(index)] = torch.from_numpy(np.array(tensor.data, dtype=np.float32))
    if not out:
        raise DataError(f"{path} holds no direction tensors")
    return _check_vectors(out)
