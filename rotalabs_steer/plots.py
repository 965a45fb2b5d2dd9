"""Figures of extracted vectors and of strength sweeps (matplotlib, the ``plots`` extra). Each returns the figure."""

from __future__ import annotations

import numpy as np
import torch

from .extraction.separation import cohens_d
from .vectors import SteeringVector, SteeringVectorSet


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError('plots need matplotlib: pip install "rotalabs-steer[plots]"') from None
    return plt


def plot_layer_metrics(vectors: SteeringVectorSet, title: str | None = None):
    """Per-layer vector norm, held-out accuracy and Cohen's d, one panel each.

    Every axis starts at zero (accuracy shows chance at 0.5), so a small dip looks small.
    """
    plt = _pyplot()
    layers = vectors.layers
    fig, (ax_norm, ax_acc, ax_d) = plt.subplots(1, 3, figsize=(13, 3.8))
    ax_norm.plot(layers, [vectors[i].norm for i in layers], marker="o")
    ax_norm.set(xlabel="layer (output of block)", ylabel="vector L2 norm", title="norm")
    ax_norm.set_ylim(bottom=0)
    accuracy = [vectors[i].metadata.get("separation_accuracy") for i in layers]
    cohens_d = [vectors[i].metadata.get("separation_cohens_d") for i in layers]
    if any(a is not None for a in accuracy):
        ax_acc.plot(layers, [a if a is not None else float("nan") for a in accuracy], marker="o", color="tab:green")
        ax_acc.axhline(0.5, color="grey", linestyle=":", linewidth=1, label="chance")
        ax_acc.set(xlabel="layer (output of block)", ylabel="accuracy", ylim=(0, 1.02),
                   title="held-out accuracy")
        ax_acc.legend(loc="lower right")
        ax_d.plot(layers, [d if d is not None else float("nan") for d in cohens_d], marker="s", color="tab:purple")
        ax_d.set(xlabel="layer (output of block)", ylabel="Cohen's d", title="held-out Cohen's d")
        ax_d.set_ylim(bottom=0)
    else:
        for axis in (ax_acc, ax_d):
            axis.text(0.5, 0.5, "no separation figures", ha="center", va="center", transform=axis.transAxes)
    for axis in (ax_norm, ax_acc, ax_d):
        axis.set_xticks(layers)
    fig.suptitle(title or f"{vectors.behavior} vectors of {vectors.model_name}")
    fig.tight_layout()
    return fig


def plot_projection_histogram(vector: SteeringVector, positive_rows, negative_rows, *, bins: int = 30,
                              title: str | None = None):
    """Histograms of positive and negative rows projected onto ``vector``'s direction.

    Rows are activations at the vector's layer, ``[n, hidden]`` (numpy or torch), e.g. the rows
    ``_core.Accumulator(..., sample_rows=N).samples(slot)`` keeps (group code ``side + 2 * fold``,
    side 0 positive). The dashed line is the midpoint of the two means; the accuracy and Cohen's d
    in the title are measured on these rows, so rows the vector was built from flatter it (the
    held-out figures are in ``vector.metadata``).
    """
    plt = _pyplot()
    norm = vector.norm
    if norm == 0.0 or not np.isfinite(norm):
        raise ValueError(f"vector has norm {norm}; it has no direction to project onto")
    unit = vector.vector.detach().to("cpu", torch.float64).numpy() / norm
    positive = _rows(positive_rows, "positive_rows", vector.dim) @ unit
    negative = _rows(negative_rows, "negative_rows", vector.dim) @ unit
    midpoint = (positive.mean() + negative.mean()) / 2
    accuracy = (np.sum(positive > midpoint) + np.sum(negative <= midpoint)) / (len(positive) + len(negative))
    return _draw_projections(
        plt, positive, negative, midpoint, "midpoint of means", bins,
        title or f"{vector.behavior}, layer {vector.layer_index}: accuracy {accuracy:.2f}, "
                 f"Cohen's d {cohens_d(positive, negative):.2f} on these rows")


def plot_held_out_projections(vector: SteeringVector, *, bins: int = 30, title: str | None = None):
    """Histograms of the held-out rows extraction sampled, scored against the other folds' vector.

    Needs a vector fresh from ``extract_caa_vector(s)`` (``held_out_projections`` is not saved
    to disk). These are the scores behind ``metadata["separation_accuracy"]`` / ``cohens_d``.
    """
    plt = _pyplot()
    projections = vector.held_out_projections
    if not projections or len(projections["positive"]) + len(projections["negative"]) == 0:
        raise ValueError("vector has no held-out projections: they come from extraction with "
                         "separation_sample > 0 and at least 2 pairs, and are not saved to disk")
    positive, negative = np.asarray(projections["positive"]), np.asarray(projections["negative"])
    accuracy = vector.metadata.get("separation_accuracy")
    d = vector.metadata.get("separation_cohens_d")
    figures = ", ".join(f"{name} {value:.2f}" for name, value in (("accuracy", accuracy), ("Cohen's d", d))
                        if isinstance(value, float))
    return _draw_projections(plt, positive, negative, 0.0, "held-out midpoint", bins,
                             title or f"{vector.behavior}, layer {vector.layer_index}, held out: {figures}")


def _draw_projections(plt, positive: np.ndarray, negative: np.ndarray, midpoint: float, midpoint_label: str,
                      bins: int, title: str):
    edges = np.histogram_bin_edges(np.concatenate([positive, negative]), bins=bins)
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    ax.hist(positive, bins=edges, alpha=0.6, color="tab:red", label=f"positive (n={len(positive)})")
    ax.hist(negative, bins=edges, alpha=0.6, color="tab:blue", label=f"negative (n={len(negative)})")
    ax.axvline(midpoint, color="gray", linestyle="--", label=midpoint_label)
    ax.set(xlabel="projection onto the unit vector", ylabel="rows")
    ax.legend()
    ax.set_title(title)
    fig.tight_layout()
    return fig


# Panels of plot_strength_sweep: a row key each, and its y label.
_SWEEP_PANELS = {
    "refusal_logprob": "log P(refusal opening)",
    "refusal_log_odds": "log-odds refusal vs compliance opening",
    "refusal_rate": "fraction of generations refusing",
    "matching_probability": "P(matching answer letter)",
    "perplexity": "perplexity under the unsteered model",
    "behavior_rate": "fraction of responses with the behaviour",
}


def plot_strength_sweep(rows, title: str | None = None):
    """Each score against steering strength: rows of ``evaluation.score_strengths`` (dicts or a
    DataFrame) or of the reference-style ``evaluation.strength_sweep``."""
    plt = _pyplot()
    rows = rows.to_dict("records") if hasattr(rows, "to_dict") else list(rows)
    if not rows or not all(isinstance(row, dict) and "strength" in row for row in rows):
        raise ValueError("rows must be the non-empty output of score_strengths or strength_sweep "
                         "(dicts with 'strength')")
    rows = sorted(rows, key=lambda row: row["strength"])
    keys = [key for key in _SWEEP_PANELS if key in rows[0]]
    if not keys:
        raise ValueError(f"rows hold none of the scores {list(_SWEEP_PANELS)}")
    fig, axes = plt.subplots(1, len(keys), figsize=(3.6 * len(keys), 3.4), squeeze=False)
    strengths = [row["strength"] for row in rows]
    for ax, key in zip(axes[0], keys):
        ax.plot(strengths, [row[key] for row in rows], marker="o")
        ax.axvline(0.0, color="gray", linewidth=0.8)
        ax.set(xlabel="steering strength", ylabel=_SWEEP_PANELS[key])
        if key == "perplexity":
            ax.set_yscale("log")
        elif key in ("refusal_rate", "matching_probability", "behavior_rate"):
            ax.set_ylim(-0.02, 1.02)
    fig.suptitle(title or "steering strength sweep")
    fig.tight_layout()
    return fig


def _rows(rows, name: str, dim: int) -> np.ndarray:
    if isinstance(rows, torch.Tensor):
        rows = rows.detach().to("cpu", torch.float64).numpy()
    rows = np.asarray(rows, dtype=np.float64)
    if rows.ndim != 2 or rows.shape[1] != dim or len(rows) == 0:
        raise ValueError(f"{name} must be a non-empty [n, {dim}] array, got shape {rows.shape}")
    return rows
