"""SteeringVector and SteeringVectorSet: the extracted directions and their files.

``save(NAME)`` writes ``NAME.json`` (everything but the tensor) and the tensor twice:
``NAME.safetensors``, which this package reads, and ``NAME.pt`` (``torch.save`` of the plain
tensor), the reference package's layout, so rotalabs-steer 1.2.0 loads every file written
here. Files the reference wrote (``NAME.json`` + ``NAME.pt``) load too, through
``torch.load(weights_only=True)``, so no file can run code when it is loaded.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .json_files import read_json_object, write_json

FORMAT_VERSION = 2
FORMAT_NAME = "rotalabs_steer"  # in sidecars written here; the reference writes no "format" key
_TENSOR_KEY = "vector"


@dataclass
class SteeringVector:
    """A direction in the output space of one decoder block, for one behaviour."""

    behavior: str
    layer_index: int
    vector: torch.Tensor
    model_name: str
    extraction_method: str = "caa"
    metadata: dict[str, Any] = field(default_factory=dict)
    # Set by extraction, not saved: held-out sampled rows projected onto the unit vector of
    # the folds they were not part of, minus the midpoint, {"positive": [n], "negative": [m]}.
    # Keyword-only: the reference's six positional fields stay the constructor's positional ones.
    held_out_projections: dict[str, Any] | None = field(default=None, repr=False, compare=False, kw_only=True)

    def __post_init__(self) -> None:
        if not isinstance(self.vector, torch.Tensor):
            raise TypeError(f"vector must be a torch.Tensor, not {type(self.vector).__name__}")
        if self.vector.ndim != 1:
            raise ValueError(f"vector must be 1-D [hidden], got shape {tuple(self.vector.shape)}")
        if isinstance(self.layer_index, bool) or not isinstance(self.layer_index, int):
            raise TypeError(f"layer_index must be an int, not {type(self.layer_index).__name__}")
        self.metadata.setdefault("created_at", datetime.now().isoformat())

    @property
    def norm(self) -> float:
        """L2 norm of the vector."""
        return float(self.vector.double().norm())

    @property
    def dim(self) -> int:
        """Hidden size the vector lives in."""
        return int(self.vector.shape[-1])

    def _replace(self, vector: torch.Tensor, **extra_metadata: Any) -> SteeringVector:
        return SteeringVector(
            behavior=self.behavior,
            layer_index=self.layer_index,
            vector=vector,
            model_name=self.model_name,
            extraction_method=self.extraction_method,
            metadata={**self.metadata, **extra_metadata},
            held_out_projections=self.held_out_projections,  # direction unchanged by these copies
        )

    def normalize(self) -> SteeringVector:
        """Copy with unit L2 norm."""
        norm = self.norm
        if norm == 0.0 or not math.isfinite(norm):
            raise ValueError(f"cannot normalize a vector of norm {norm}")
        return self._replace(self.vector / norm, normalized=True)

    def scale(self, factor: float) -> SteeringVector:
        """Copy multiplied by ``factor``."""
        return self._replace(self.vector * factor, scale_factor=factor)

    def to(self, device: Any = None, *args: Any, **kwargs: Any) -> SteeringVector:
        """Copy on another device and/or dtype (same arguments as ``torch.Tensor.to``)."""
        return self._replace(self.vector.to(*_tensor_to_args(device, args), **kwargs))

    def save(self, path: str | Path) -> None:
        """Write ``path.json``, ``path.safetensors`` and ``path.pt`` (any suffix of ``path`` is replaced)."""
        base = _strip_suffix(Path(path))
        base.parent.mkdir(parents=True, exist_ok=True)
        # clone: torch.save of a view would store the whole underlying storage
        tensor = self.vector.detach().to("cpu").contiguous().clone()
        sidecar = {
            "behavior": self.behavior,
            "layer_index": self.layer_index,
            "model_name": self.model_name,
            "extraction_method": self.extraction_method,
            "metadata": self.metadata,
            "vector_shape": list(tensor.shape),
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "vector_dtype": str(tensor.dtype).removeprefix("torch."),
        }
        # Every file goes in whole or not at all, so a failed save never pairs a new sidecar
        # with an old tensor; the sidecar goes last.
        _write_atomically(base.with_suffix(".safetensors"), lambda p: save_file({_TENSOR_KEY: tensor}, str(p)))
        _write_atomically(base.with_suffix(".pt"), lambda p: torch.save(tensor, p))
        _write_atomically(base.with_suffix(".json"), lambda p: write_json(p, sidecar))

    @classmethod
    def load(cls, path: str | Path) -> SteeringVector:
        """Read a vector saved by ``save`` (or by the reference package: ``.json`` + ``.pt``)."""
        base = _strip_suffix(Path(path))
        meta_path = base.with_suffix(".json")
        sidecar = _read_sidecar(meta_path)
        # A sidecar without our marker was written by the reference, which writes only the .pt:
        # a .safetensors beside it is from an earlier save of ours and may be stale.
        vector = _read_tensor(base, prefer_safetensors=sidecar.get("format") == FORMAT_NAME)
        expected = sidecar.get("vector_shape")
        if expected is not None and list(vector.shape) != list(expected):
            raise ValueError(
                f"{base}: tensor has shape {list(vector.shape)} but {meta_path.name} says {expected}"
            )
        if vector.ndim == 2 and vector.shape[0] == 1:
            warnings.warn(f"{base}: the stored vector has shape {list(vector.shape)}; "
                          "loaded as a 1-D vector of its single row", UserWarning, stacklevel=2)
            vector = vector[0]
        return cls(
            behavior=sidecar["behavior"],
            layer_index=sidecar["layer_index"],
            vector=vector,
            model_name=sidecar["model_name"],
            extraction_method=sidecar.get("extraction_method", "caa"),
            metadata=sidecar.get("metadata", {}),
        )


def _tensor_to_args(device: Any, args: tuple) -> tuple:
    """``to(device, ...)`` named its first argument as the reference does; None means not given."""
    return args if device is None else (device, *args)


def _write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """``write`` to a temporary file beside ``path``, then rename it over ``path``."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def _separation_key(vector: SteeringVector) -> tuple[float, float]:
    def finite(x: Any) -> float:
        return float(x) if isinstance(x, (int, float)) and math.isfinite(x) else -math.inf
    return finite(vector.metadata["separation_accuracy"]), finite(vector.metadata.get("separation_cohens_d"))


def _strip_suffix(path: Path) -> Path:
    return path.with_suffix("") if path.suffix in (".json", ".pt", ".safetensors") else path


def _read_sidecar(meta_path: Path) -> dict[str, Any]:
    sidecar = read_json_object(meta_path, f"no steering-vector metadata at {meta_path}")
    for key, kind in (("behavior", str), ("layer_index", int), ("model_name", str)):
        value = sidecar.get(key)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise ValueError(f"{meta_path}: field {key!r} must be a {kind.__name__}, got {value!r}")
    if not isinstance(sidecar.get("metadata", {}), dict):
        raise ValueError(f"{meta_path}: field 'metadata' must be an object")
    if not isinstance(sidecar.get("extraction_method", "caa"), str):
        raise ValueError(f"{meta_path}: field 'extraction_method' must be a str, "
                         f"got {sidecar['extraction_method']!r}")
    shape = sidecar.get("vector_shape")
    if shape is not None and not (isinstance(shape, list) and all(
            isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape)):
        raise ValueError(f"{meta_path}: field 'vector_shape' must be a list of sizes, got {shape!r}")
    return sidecar


def _read_tensor(base: Path, prefer_safetensors: bool = True) -> torch.Tensor:
    st_path, pt_path = base.with_suffix(".safetensors"), base.with_suffix(".pt")
    if st_path.exists() and (prefer_safetensors or not pt_path.exists()):
        try:
            tensors = load_file(str(st_path))
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{st_path}: not a readable safetensors file ({e})") from None
        if set(tensors) != {_TENSOR_KEY}:
            raise ValueError(f"{st_path}: expected one tensor named {_TENSOR_KEY!r}, found {sorted(tensors)}")
        vector = tensors[_TENSOR_KEY]
    elif pt_path.exists():
        try:
            # weights_only: a .pt file is a pickle, and only plain tensors may come out of it
            vector = torch.load(pt_path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - torch raises many types for a bad pickle
            raise ValueError(f"{pt_path}: not a loadable tensor file ({type(e).__name__}: {e})") from None
    else:
        raise FileNotFoundError(f"no steering-vector tensor at {st_path} or {pt_path}")
    # 1-D, or [1, hidden] as some reference-era scripts saved (load() squeezes it, with a warning)
    if not isinstance(vector, torch.Tensor) or not vector.is_floating_point() or not (
            vector.ndim == 1 or (vector.ndim == 2 and vector.shape[0] == 1)):
        found = (f"{str(vector.dtype).removeprefix('torch.')} of shape {list(vector.shape)}"
                 if isinstance(vector, torch.Tensor) else type(vector).__name__)
        raise ValueError(f"{base}: expected a 1-D floating-point tensor (or one [1, hidden] row), got {found}")
    if not torch.isfinite(vector).all():
        raise ValueError(f"{base}: the stored vector contains NaN or inf (a corrupted file?)")
    return vector


def _saved_layers(directory: Path) -> list[int]:
    """The layers an earlier save listed in ``directory/metadata.json`` (none if unreadable)."""
    try:
        layers = read_json_object(directory / "metadata.json").get("layers")
    except (FileNotFoundError, ValueError):
        return []
    if not isinstance(layers, list):
        return []
    return [i for i in layers if isinstance(i, int) and not isinstance(i, bool)]


class SteeringVectorSet:
    """Vectors for one behaviour, one per layer."""

    def __init__(self, behavior: str, vectors: list[SteeringVector] | None = None):
        self.behavior = behavior
        self._vectors: dict[int, SteeringVector] = {}
        for vector in vectors or []:
            self.add(vector)

    def add(self, vector: SteeringVector) -> None:
        """Add (or replace) the vector of ``vector.layer_index``."""
        if not isinstance(vector, SteeringVector):
            raise TypeError(f"vector must be a SteeringVector, not {type(vector).__name__}")
        if vector.behavior != self.behavior:
            raise ValueError(f"vector behavior {vector.behavior!r} != set behavior {self.behavior!r}")
        self._vectors[vector.layer_index] = vector

    def get(self, layer_index: int) -> SteeringVector | None:
        """The vector of a layer, or None."""
        return self._vectors.get(layer_index)

    def get_best(self, metric: str = "norm") -> SteeringVector:
        """The vector that scores highest on ``metric``.

        ``"norm"`` (the default, as in the reference) picks the largest vector, which mostly
        picks the deepest layer. ``"separation"`` picks the layer whose vector best separates
        held-out positive from negative rows (accuracy, then Cohen's d), measured during
        extraction; prefer it for new code.
        """
        if not self._vectors:
            raise ValueError("get_best() on an empty SteeringVectorSet")
        if metric == "norm":
            return max(self._vectors.values(), key=lambda v: v.norm)
        if metric == "separation":
            missing = [v.layer_index for v in self if "separation_accuracy" not in v.metadata]
            if missing:
                raise ValueError(f"layers {missing} have no separation figures (extracted with "
                                 "separation_sample=0 or by another tool); use metric='norm'")
            return max(self._vectors.values(), key=_separation_key)
        raise ValueError(f"unknown metric {metric!r}; expected 'norm' or 'separation'")

    @property
    def layers(self) -> list[int]:
        """Layer indices that have a vector, sorted."""
        return sorted(self._vectors)

    @property
    def model_name(self) -> str | None:
        """Model name of the vectors, or None for an empty set."""
        return next(iter(self._vectors.values())).model_name if self._vectors else None

    def to(self, device: Any = None, *args: Any, **kwargs: Any) -> SteeringVectorSet:
        """Copy with every vector moved (same arguments as ``torch.Tensor.to``)."""
        return SteeringVectorSet(self.behavior, [v.to(device, *args, **kwargs) for v in self])

    def save(self, dir_path: str | Path) -> None:
        """Write ``layer_{i}.json`` / ``.safetensors`` / ``.pt`` per layer and ``metadata.json``.

        Saving over an earlier set removes the files of the layers it had and this one lacks.
        """
        directory = Path(dir_path)
        directory.mkdir(parents=True, exist_ok=True)
        for layer in sorted(set(_saved_layers(directory)) - set(self.layers)):
            for suffix in (".json", ".safetensors", ".pt"):
                (directory / f"layer_{layer}").with_suffix(suffix).unlink(missing_ok=True)
        for layer in self.layers:
            self._vectors[layer].save(directory / f"layer_{layer}")
        meta = {"behavior": self.behavior, "layers": self.layers, "model_name": self.model_name}
        write_json(directory / "metadata.json", meta)

    @classmethod
    def load(cls, dir_path: str | Path) -> SteeringVectorSet:
        """Read a directory written by ``save`` (ours or the reference package's)."""
        directory = Path(dir_path)
        meta_path = directory / "metadata.json"
        meta = read_json_object(meta_path, f"no metadata.json in {directory}")
        layers = meta.get("layers")
        if not isinstance(meta.get("behavior"), str) or not (
            isinstance(layers, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in layers)
        ):
            raise ValueError(f"{meta_path}: expected {{'behavior': str, 'layers': [int, ...]}}")
        duplicates = sorted({i for i in layers if layers.count(i) > 1})
        if duplicates:
            raise ValueError(f"{meta_path}: 'layers' lists layer(s) {duplicates} more than once")
        vector_set = cls(meta["behavior"])
        for layer in layers:
            vector = SteeringVector.load(directory / f"layer_{layer}")
            if vector.layer_index != layer:
                raise ValueError(f"{directory}/layer_{layer}.json has layer_index {vector.layer_index}")
            first = next(iter(vector_set), None)
            if first is not None and vector.dim != first.dim:
                raise ValueError(f"{directory}: layer_{layer} has {vector.dim} dimensions but "
                                 f"layer_{first.layer_index} has {first.dim}; the files are from different models")
            vector_set.add(vector)
        return vector_set

    def __len__(self) -> int:
        return len(self._vectors)

    def __iter__(self) -> Iterator[SteeringVector]:
        return iter(self._vectors.values())

    def __contains__(self, layer_index: object) -> bool:
        return layer_index in self._vectors

    def __getitem__(self, layer_index: int) -> SteeringVector:
        if layer_index not in self._vectors:
            raise KeyError(f"no vector for layer {layer_index}; layers: {self.layers}")
        return self._vectors[layer_index]

    def __repr__(self) -> str:
        return f"SteeringVectorSet(behavior={self.behavior!r}, layers={self.layers})"
