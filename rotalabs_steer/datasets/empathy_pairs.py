"""Reference import path ``rotalabs_steer.datasets.empathy_pairs``: this package's own
empathy pairs (``data/empathy.jsonl``), as ``{"positive", "negative"}`` dicts."""

from .base import ContrastPair, ContrastPairDataset
from .builtin import load_empathy_pairs, pairs_as_dicts

EMPATHY_PAIRS = pairs_as_dicts("empathy")

__all__ = ["ContrastPair", "ContrastPairDataset", "EMPATHY_PAIRS", "load_empathy_pairs"]
