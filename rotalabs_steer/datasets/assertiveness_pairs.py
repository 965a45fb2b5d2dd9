"""Reference import path ``rotalabs_steer.datasets.assertiveness_pairs``: this package's own
assertiveness pairs (``data/assertiveness.jsonl``), as ``{"positive", "negative"}`` dicts."""

from .base import ContrastPair, ContrastPairDataset
from .builtin import load_assertiveness_pairs, pairs_as_dicts

ASSERTIVENESS_PAIRS = pairs_as_dicts("assertiveness")

__all__ = ["ASSERTIVENESS_PAIRS", "ContrastPair", "ContrastPairDataset", "load_assertiveness_pairs"]
