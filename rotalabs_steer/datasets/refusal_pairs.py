"""Reference import path ``rotalabs_steer.datasets.refusal_pairs``: this package's own
refusal pairs (``data/refusal.jsonl``), as ``{"positive", "negative"}`` dicts."""

from .base import ContrastPair, ContrastPairDataset
from .builtin import get_refusal_pairs, load_refusal_pairs, pairs_as_dicts

REFUSAL_PAIRS_RAW = pairs_as_dicts("refusal")

__all__ = ["ContrastPair", "ContrastPairDataset", "REFUSAL_PAIRS_RAW", "get_refusal_pairs", "load_refusal_pairs"]
