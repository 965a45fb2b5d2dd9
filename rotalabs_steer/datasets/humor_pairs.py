"""Reference import path ``rotalabs_steer.datasets.humor_pairs``: this package's own
humor pairs (``data/humor.jsonl``), as ``{"positive", "negative"}`` dicts."""

from .base import ContrastPair, ContrastPairDataset
from .builtin import load_humor_pairs, pairs_as_dicts

HUMOR_PAIRS = pairs_as_dicts("humor")

__all__ = ["ContrastPair", "ContrastPairDataset", "HUMOR_PAIRS", "load_humor_pairs"]
