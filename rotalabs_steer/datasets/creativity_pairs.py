"""Reference import path ``rotalabs_steer.datasets.creativity_pairs``: this package's own
creativity pairs (``data/creativity.jsonl``), as ``{"positive", "negative"}`` dicts."""

from .base import ContrastPair, ContrastPairDataset
from .builtin import load_creativity_pairs, pairs_as_dicts

CREATIVITY_PAIRS = pairs_as_dicts("creativity")

__all__ = ["CREATIVITY_PAIRS", "ContrastPair", "ContrastPairDataset", "load_creativity_pairs"]
