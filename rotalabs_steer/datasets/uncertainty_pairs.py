"""Reference import path ``rotalabs_steer.datasets.uncertainty_pairs``: this package's own
uncertainty pairs (``data/uncertainty.jsonl``), as ``{"positive", "negative"}`` dicts."""

from .base import ContrastPair, ContrastPairDataset
from .builtin import load_uncertainty_pairs, pairs_as_dicts

UNCERTAINTY_PAIRS = pairs_as_dicts("uncertainty")

__all__ = ["ContrastPair", "ContrastPairDataset", "UNCERTAINTY_PAIRS", "load_uncertainty_pairs"]
