"""llama.cpp control vectors: a SteeringVectorSet to and from the GGUF files of llama.cpp and repeng.

A file holds ``general.architecture = "controlvector"``, ``controlvector.model_hint`` (a string),
``controlvector.layer_count`` (the number of directions) and one float32 tensor ``direction.{n}``
of shape [hidden] per steered layer, as repeng's ``ControlVector.export_gguf`` writes it.

Layer numbering: ``direction.{i}`` is our ``layer_index`` i, with no offset. llama.cpp adds
``direction.N`` to the output of decoder block N, counting blocks from 0, as we do:

- ``common/common.cpp``, ``common_control_vector_load_one``: parses N from the tensor name,
  rejects N == 0 and stores the data at ``n_embd * (N - 1)`` ("layer 1 at [0]");
- ``src/llama-adapter.cpp``, ``llama_adapter_cvec::apply``: copies ``data + n_embd * (il - 1)``
  into ``tensors[il]`` for il = 1 .. n_layer - 1 ("there's never a tensor for layer 0");
- ``src/models/llama.cpp`` (and every architecture): in ``for (int il = 0; il < n_layer; ++il)``
  the block's output, after the FFN residual add, goes through ``build_cvec(cur, il)``.

repeng agrees: it writes ``direction.{i}`` for the vector it adds to the output of its block i
(``hidden_states[i + 1]``). llama.cpp's own ``cvector-generator`` does not: it reads block i's
output and writes ``direction.{i + 1}`` (tools/cvector-generator/mean.hpp, pca.hpp), so llama.cpp
applies such a vector one block after the one it was read at. ``import_gguf`` keeps N as the
layer, which is where llama.cpp applies it.

The output of block 0 cannot be steered by llama.cpp, so ``export_gguf`` refuses layer 0.
llama.cpp adds the direction, times the scale given with ``--control-vector-scaled FILE S``, at
every position: ``ActivationInjector(model, vectors, strength=S)`` with its default
``injection_mode="all"``, ``apply_to="both"`` does the same.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import torch

from .vectors import SteeringVector, SteeringVectorSet

ARCHITECTURE = "controlvector"
_DIRECTION = re.compile(r"direction\.(\d+)")


def _gguf():
    try:
        import gguf
    except ImportError:
        raise ImportError('GGUF files need the gguf package: pip install "rotalabs-steer[model]" '
                          "(or pip install gguf)") from None
    return gguf


def export_gguf(vector_set: SteeringVectorSet, path: str | os.PathLike, *, model_hint: str | None = None) -> None:
    """Write ``vector_set`` as a llama.cpp control vector (``llama-cli --control-vector path``).

    ``model_hint`` defaults to the set's model name; llama.cpp does not read it.
    """
    gguf = _gguf()
    if not isinstance(vector_set, SteeringVectorSet):
        raise TypeError(f"vector_set must be a SteeringVectorSet, not {type(vector_set).__name__}")
    if not len(vector_set):
        raise ValueError("vector_set is empty; nothing to export")
    unsteerable = [layer for layer in vector_set.layers if layer < 1]
    if unsteerable:
        raise ValueError(f"vector_set: layer(s) {unsteerable} cannot be exported: llama.cpp steers the "
                         "outputs of blocks 1 and up (it rejects direction.0; negative indices need the "
                         "model's block count)")
    dims = sorted({vector.dim for vector in vector_set})
    if len(dims) > 1:
        raise ValueError(f"vector_set: vectors have different sizes {dims}; llama.cpp needs one hidden size")
    for vector in vector_set:
        if not torch.isfinite(vector.vector).all():
            raise ValueError(f"vector_set: layer {vector.layer_index} contains NaN or inf")
    hint = model_hint if model_hint is not None else vector_set.model_name
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), ARCHITECTURE)
    writer.add_string(f"{ARCHITECTURE}.model_hint", hint)
    writer.add_uint32(f"{ARCHITECTURE}.layer_count", len(vector_set))
    for layer in vector_set.layers:
        data = vector_set[layer].vector.detach().to("cpu", torch.float32).contiguous().numpy()
        writer.add_tensor(f"direction.{layer}", data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def import_gguf(path: str | os.PathLike, behavior: str = "unknown") -> SteeringVectorSet:
    """Read a control-vector GGUF file (ours, repeng's or llama.cpp's) as a SteeringVectorSet.

    ``direction.N`` becomes the vector of layer N; the model hint becomes ``model_name``.
    """
    gguf = _gguf()
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no GGUF file at {path}")
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, OSError) as e:
        raise ValueError(f"{path}: not a readable GGUF file ({e})") from None
    architecture = _string_field(reader, "general.architecture", path)
    if architecture != ARCHITECTURE:
        raise ValueError(f"{path}: general.architecture is {architecture!r}, not {ARCHITECTURE!r}; "
                         "not a control vector")
    model_hint = _string_field(reader, f"{ARCHITECTURE}.model_hint", path) or "unknown"
    vectors = []
    for tensor in reader.tensors:
        match = _DIRECTION.fullmatch(tensor.name)
        if match is None or int(match.group(1)) == 0:
            raise ValueError(f"{path}: tensor {tensor.name!r} is not direction.N with N >= 1")
        if tensor.tensor_type != gguf.GGMLQuantizationType.F32 or len(tensor.shape) != 1:
            raise ValueError(f"{path}: tensor {tensor.name!r} must be 1-D float32, got "
                             f"{tensor.tensor_type.name} of shape {list(tensor.shape)}")
        data = torch.from_numpy(np.array(tensor.data, dtype=np.float32))  # a copy: the reader maps the file
        vectors.append(SteeringVector(behavior, int(match.group(1)), data, model_hint, extraction_method="gguf",
                                      metadata={"source": str(path)}))
    if not vectors:
        raise ValueError(f"{path}: no direction tensors")
    if len({vector.dim for vector in vectors}) > 1:
        raise ValueError(f"{path}: direction tensors have different sizes")
    return SteeringVectorSet(behavior, vectors)


def _string_field(reader, key: str, path: Path) -> str | None:
    field = reader.get_field(key)
    if field is None:
        return None
    value = field.contents()
    if not isinstance(value, str):
        raise ValueError(f"{path}: {key} must be a string, got {value!r}")
    return value
