"""Per-layer sufficient statistics of a pair set, and the vectors every method makes from them.

A ``PairStatistics`` holds, per layer, float64 sums of positive and negative rows per fold
(CAA and its held-out figures), and, when second moments were collected, the count, sum and
second moment of the paired differences d = pos - neg (PCA, PCA-diff, Fisher; see
``methods.py``). Memory is O(layers x hidden^2) whatever the number of pairs; two sets merge
with ``+``; ``save``/``load`` use one safetensors file whose header carries the JSON metadata
(loading never runs code).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from ..validation import check_choice
from ..vectors import SteeringVector, SteeringVectorSet
from .batching import NEGATIVE, POSITIVE
from .methods import DIRECTION_METHODS, direction
from .separation import held_out_projections, projection_figures

METHODS = ("caa",) + DIRECTION_METHODS
_FORMAT = "rotalabs_steer.PairStatistics/1"
_ARRAYS = ("fold_sums", "fold_counts", "pair_counts", "difference_sums", "moments")

_LAYER_SEMANTICS = {
    "residual": "output of decoder block layer_index (hidden_states[layer_index + 1])",
    "mlp": "output of the feed-forward (MLP) submodule of decoder block layer_index",
    "attn": "output of the self-attention submodule of decoder block layer_index",
}


@dataclass
class PairStatistics:
    """Sufficient statistics of one pair set at several layers (see the module docstring).

    Arrays, L layers of width H and K folds: ``fold_sums`` float64 [L, 2K, H] (row group
    side + 2 * fold), ``fold_counts`` int64 [L, 2K]; with second moments, ``pair_counts``
    int64 [L], ``difference_sums`` float64 [L, H], ``moments`` float64 [L, H, H].
    ``samples``: per layer, (rows [n, H], groups [n]) of a bounded row sample for the held-out
    separation figures.
    """

    layers: list[int]
    behavior: str
    model_name: str
    token_position: str
    num_pairs: int
    fold_sums: np.ndarray
    fold_counts: np.ndarray
    pair_counts: np.ndarray | None = None
    difference_sums: np.ndarray | None = None
    moments: np.ndarray | None = None
    samples: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)
    sample_rows: int = 0
    info: dict = field(default_factory=dict)  # batch_size, model_dtype, component, world_size

    @property
    def hidden(self) -> int:
        return int(self.fold_sums.shape[-1])

    @property
    def has_moments(self) -> bool:
        return self.moments is not None

    # ------------------------------------------------------------------ vectors

    def vectors(self, method: str = "caa", **options) -> SteeringVectorSet:
        """One vector per layer by ``method`` (``"caa"``, ``"pca"``, ``"pca_diff"``, ``"fisher"``).

        Options: ``shrinkage`` (fisher only, default 0.1). Directions are unit-norm with
        ``metadata["caa_projection"]`` = mean(d) . u, so ``vector.scale(caa_projection)``
        brings one to CAA's magnitude along it.
        """
        check_choice(method, METHODS, "method")
        unknown = set(options) - ({"shrinkage"} if method == "fisher" else set())
        if unknown:
            raise TypeError(f"method={method!r} takes no option(s) {sorted(unknown)}")
        if method != "caa" and not self.has_moments:
            raise ValueError(f"method={method!r} needs second moments, which these statistics lack "
                             "(collect them with collect_pair_statistics)")
        return SteeringVectorSet(self.behavior, [self._vector(slot, method, options) for slot in range(len(self.layers))])

    def _vector(self, slot: int, method: str, options: dict) -> SteeringVector:
        sums, counts = self.fold_sums[slot], self.fold_counts[slot]
        layer = self.layers[slot]
        with np.errstate(invalid="ignore", over="ignore", divide="ignore"):  # the error below says so
            pos_mean = sums[POSITIVE::2].sum(0) / counts[POSITIVE::2].sum()
            neg_mean = sums[NEGATIVE::2].sum(0) / counts[NEGATIVE::2].sum()
            caa = pos_mean - neg_mean
        if not (np.isfinite(pos_mean).all() and np.isfinite(neg_mean).all()):
            dtype = self.info.get("model_dtype", "unknown")
            hint = " or run it in a wider dtype (float32/bfloat16 instead of float16)" if dtype == "float16" else ""
            raise ValueError(
                f"activations at layer {layer} contain NaN or inf (model dtype {dtype}); no vector "
                f"was produced. Check the model weights{hint}"
            )
        metadata = {
            "num_pairs": self.num_pairs,
            "token_position": self.token_position,
            "pos_mean_norm": float(np.linalg.norm(pos_mean)),
            "neg_mean_norm": float(np.linalg.norm(neg_mean)),
        }
        unit = None
        if method == "caa":
            values = caa
        else:
            pairs = int(self.pair_counts[slot])
            unit, figures = direction(method, pairs, self.difference_sums[slot], self.moments[slot], **options)
            mean_difference = self.difference_sums[slot] / pairs
            values = unit
            metadata.update(figures, caa_projection=float(unit @ mean_difference),
                            cosine_with_caa=_cosine(unit, caa))
        caa_norm = float(np.linalg.norm(caa))
        caa_unit = caa / caa_norm if caa_norm > 0 else caa
        metadata.update(
            vector_norm=float(np.linalg.norm(values)),
            # where the two sides sit along the vector: operator="clamp" steers to the positive one
            pos_mean_projection=float(pos_mean @ (caa_unit if unit is None else unit)),
            neg_mean_projection=float(neg_mean @ (caa_unit if unit is None else unit)),
            num_positive=int(counts[POSITIVE::2].sum()),
            num_negative=int(counts[NEGATIVE::2].sum()),
            cosine_pos_neg=_cosine(pos_mean, neg_mean),
            batch_size=self.info.get("batch_size"),
            model_dtype=self.info.get("model_dtype", "unknown"),
            component=self.info.get("component", "residual"),
            layer_semantics=_LAYER_SEMANTICS[self.info.get("component", "residual")],
        )
        if method != "caa":
            metadata["method"] = method
        if "world_size" in self.info:
            metadata["world_size"] = self.info["world_size"]
        metadata.update({key: value for key, value in self.info.items() if key.startswith("shared_prefix")})
        vector = SteeringVector(behavior=self.behavior, layer_index=layer,
                                vector=torch.from_numpy(np.ascontiguousarray(values)).to(torch.float32),
                                model_name=self.model_name, extraction_method=method, metadata=metadata)
        if self.sample_rows and slot < len(self.samples):
            # Held-out midpoints always; for the moment methods the direction itself is
            # the whole-set one (per-fold second moments would cost folds x hidden^2).
            positive, negative = held_out_projections(sums, counts, *self.samples[slot], direction=unit)
            vector.held_out_projections = {"positive": positive, "negative": negative}
            figures = projection_figures(positive, negative)
            vector.metadata.update({f"separation_{k}": _finite_or_none(v) for k, v in figures.items()},
                                   separation_folds=sums.shape[0] // 2)
            if unit is not None:
                vector.metadata["separation_direction"] = "all pairs (midpoints held out)"
            rows = self.samples[slot][0]
            if len(rows):
                # The unit of relative steering strengths: mean L2 norm of the selected rows, both
                # sides, from the uniform sample (every row when they fit in it).
                vector.metadata["activation_norm"] = float(np.linalg.norm(rows, axis=1).mean())
                vector.metadata["activation_norm_rows"] = int(len(rows))
        return vector

    # ------------------------------------------------------------------- merging

    def __add__(self, other: PairStatistics) -> PairStatistics:
        if not isinstance(other, PairStatistics):
            return NotImplemented
        for name in ("layers", "token_position", "model_name", "hidden"):
            if getattr(self, name) != getattr(other, name):
                raise ValueError(f"cannot add PairStatistics with different {name}: "
                                 f"{getattr(self, name)!r} and {getattr(other, name)!r}")
        if self.info.get("component") != other.info.get("component"):
            raise ValueError("cannot add PairStatistics of different components")
        # Sets with fewer pairs than folds have fewer folds: any partition of the pairs
        # keeps the held-out figures valid, so the missing folds are empty ones.
        groups = max(self.fold_sums.shape[1], other.fold_sums.shape[1])
        both = self.has_moments and other.has_moments
        capacity = max(self.sample_rows, other.sample_rows)
        return replace(
            self,
            behavior=self.behavior if self.behavior == other.behavior else f"{self.behavior}+{other.behavior}",
            num_pairs=self.num_pairs + other.num_pairs,
            fold_sums=_pad_groups(self.fold_sums, groups) + _pad_groups(other.fold_sums, groups),
            fold_counts=_pad_groups(self.fold_counts, groups) + _pad_groups(other.fold_counts, groups),
            pair_counts=self.pair_counts + other.pair_counts if both else None,
            difference_sums=self.difference_sums + other.difference_sums if both else None,
            moments=self.moments + other.moments if both else None,
            samples=[_merge_samples(a, b, capacity) for a, b in zip(self.samples, other.samples)],
            sample_rows=capacity,
            info={**self.info, "world_size": None} if "world_size" in self.info else dict(self.info),
        )

    # ------------------------------------------------------------------- files

    def save(self, path: str | Path) -> None:
        """Write one ``.safetensors`` file: the arrays, and the metadata as JSON in its header."""
        from safetensors.numpy import save_file

        arrays = {name: np.ascontiguousarray(getattr(self, name)) for name in _ARRAYS
                  if getattr(self, name) is not None}
        for slot, (rows, groups) in enumerate(self.samples):
            arrays[f"sample_rows.{slot}"] = np.ascontiguousarray(rows)
            arrays[f"sample_groups.{slot}"] = np.ascontiguousarray(groups)
        header = {"format": _FORMAT, "layers": self.layers, "behavior": self.behavior,
                  "model_name": self.model_name, "token_position": self.token_position,
                  "num_pairs": self.num_pairs, "sample_rows": self.sample_rows,
                  "num_samples": len(self.samples), "info": self.info}
        save_file(arrays, str(path), metadata={"rotalabs_steer": json.dumps(header)})

    @classmethod
    def load(cls, path: str | Path) -> PairStatistics:
        """Read a file written by ``save`` (plain tensors and JSON: no code runs)."""
        from safetensors import safe_open

        with safe_open(str(path), framework="numpy") as f:
            raw = (f.metadata() or {}).get("rotalabs_steer")
            header = json.loads(raw) if raw else {}
            if header.get("format") != _FORMAT:
                raise ValueError(f"{path} is not a PairStatistics file (written by PairStatistics.save)")
            arrays = {name: f.get_tensor(name) for name in f.keys()}
        samples = [(arrays.pop(f"sample_rows.{s}"), arrays.pop(f"sample_groups.{s}"))
                   for s in range(header["num_samples"])]
        return cls(layers=list(header["layers"]), behavior=header["behavior"], model_name=header["model_name"],
                   token_position=header["token_position"], num_pairs=header["num_pairs"],
                   samples=samples, sample_rows=header["sample_rows"], info=header["info"],
                   **{name: arrays.get(name) for name in _ARRAYS})

    def __repr__(self) -> str:
        return (f"PairStatistics(layers={self.layers}, num_pairs={self.num_pairs}, hidden={self.hidden}, "
                f"token_position={self.token_position!r}, second_moments={self.has_moments})")


def _pad_groups(array: np.ndarray, groups: int) -> np.ndarray:
    """``array`` ([layers, groups, ...]) with zero groups appended up to ``groups``."""
    padding = [(0, 0)] * array.ndim
    padding[1] = (0, groups - array.shape[1])
    return np.pad(array, padding)


def _merge_samples(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray], capacity: int):
    """Both sets' sampled rows; a fixed-seed subsample when they exceed ``capacity``."""
    rows, groups = np.concatenate([a[0], b[0]]), np.concatenate([a[1], b[1]])
    if len(rows) > capacity:
        keep = np.sort(np.random.default_rng(0).choice(len(rows), capacity, replace=False))
        rows, groups = rows[keep], groups[keep]
    return rows, groups


def _finite_or_none(value):
    """JSON has no NaN or inf: undefined figures are stored as null."""
    return value if not isinstance(value, float) or math.isfinite(value) else None


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    denominator = float(np.linalg.norm(a) * np.linalg.norm(b))
    return float(a @ b) / denominator if denominator > 0 and math.isfinite(denominator) else 0.0
