"""Figures of extracted vectors (matplotlib, the ``plots`` extra). Each returns the figure."""

from __future__ import annotations

from .vectors import SteeringVectorSet


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError('plots need matplotlib: pip install "rotalabs-steer[plots]"') from None
    return plt


def plot_layer_metrics(vectors: SteeringVectorSet, title: str | None = None):
    """Per-layer vector norm and held-out separation (accuracy, Cohen's d)."""
    plt = _pyplot()
    layers = vectors.layers
    fig, (ax_norm, ax_sep) = plt.subplots(1, 2, figsize=(10, 3.8))
    ax_norm.plot(layers, [vectors[i].norm for i in layers], marker="o")
    ax_norm.set(xlabel="layer (output of block)", ylabel="vector L2 norm", title="norm")
    accuracy = [vectors[i].metadata.get("separation_accuracy") for i in layers]
    cohens_d = [vectors[i].metadata.get("separation_cohens_d") for i in layers]
    if any(a is not None for a in accuracy):
        ax_sep.plot(layers, [a if a is not None else float("nan") for a in accuracy], marker="o",
                    color="tab:green", label="held-out accuracy")
        ax_sep.set(xlabel="layer (output of block)", ylabel="accuracy", ylim=(0.4, 1.02),
                   title="separation of positive vs negative rows")
        ax_d = ax_sep.twinx()
        ax_d.plot(layers, [d if d is not None else float("nan") for d in cohens_d], marker="s",
                  color="tab:purple", label="Cohen's d")
        ax_d.set_ylabel("Cohen's d")
        handles = ax_sep.get_legend_handles_labels()[0] + ax_d.get_legend_handles_labels()[0]
        ax_sep.legend(handles, ["held-out accuracy", "Cohen's d"], loc="lower right")
    else:
        ax_sep.text(0.5, 0.5, "no separation figures", ha="center", va="center", transform=ax_sep.transAxes)
    for axis in (ax_norm, ax_sep):
        axis.set_xticks(layers)
    fig.suptitle(title or f"{vectors.behavior} vectors of {vectors.model_name}")
    fig.tight_layout()
    return fig
