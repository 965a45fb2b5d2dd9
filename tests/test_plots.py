"""plot_layer_metrics: one panel per figure, every axis from zero."""

from __future__ import annotations

import pytest
import torch

from rotalabs_steer.vectors import SteeringVector, SteeringVectorSet

pytest.importorskip("matplotlib")


def vector_set(with_separation: bool) -> SteeringVectorSet:
    vectors = []
    for layer, (accuracy, d) in enumerate([(0.96, 4.6), (0.97, 5.05), (0.93, 4.7)]):
        metadata = {"separation_accuracy": accuracy, "separation_cohens_d": d} if with_separation else {}
        vectors.append(SteeringVector("refusal", layer, torch.full((4,), 2.0 + layer), "tiny", metadata=metadata))
    return SteeringVectorSet("refusal", vectors)


def test_layer_metrics_axes_start_at_zero():
    from rotalabs_steer.plots import plot_layer_metrics

    figure = plot_layer_metrics(vector_set(with_separation=True))
    norm, accuracy, cohens_d = figure.axes
    assert [axis.get_ylabel() for axis in figure.axes] == ["vector L2 norm", "accuracy", "Cohen's d"]
    for axis in figure.axes:
        assert axis.get_ylim()[0] == 0.0, axis.get_ylabel()
    assert cohens_d.get_ylim()[1] >= 5.05 and accuracy.get_ylim()[1] >= 0.97
    assert list(norm.lines[0].get_ydata()) == pytest.approx([4.0, 6.0, 8.0])


def test_layer_metrics_without_separation_figures_says_so():
    from rotalabs_steer.plots import plot_layer_metrics

    figure = plot_layer_metrics(vector_set(with_separation=False))
    assert all(any(t.get_text() == "no separation figures" for t in axis.texts) for axis in figure.axes[1:])
