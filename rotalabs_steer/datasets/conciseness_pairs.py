"""Reference import path ``rotalabs_steer.datasets.conciseness_pairs``: this package's own
conciseness pairs (``data/conciseness.jsonl``), as ``{"positive", "negative"}`` dicts."""

from .base import ContrastPair, ContrastPairDataset
from .builtin import load_conciseness_pairs, pairs_as_dicts

CONCISENESS_PAIRS = pairs_as_dicts("conciseness")

__all__ = ["CONCISENESS_PAIRS", "ContrastPair", "ContrastPairDataset", "load_conciseness_pairs"]
