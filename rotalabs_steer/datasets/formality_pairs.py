"""Reference import path ``rotalabs_steer.datasets.formality_pairs``: this package's own
formality pairs (``data/formality.jsonl``), as ``{"positive", "negative"}`` dicts."""

from .base import ContrastPair, ContrastPairDataset
from .builtin import load_formality_pairs, pairs_as_dicts

FORMALITY_PAIRS = pairs_as_dicts("formality")

__all__ = ["ContrastPair", "ContrastPairDataset", "FORMALITY_PAIRS", "load_formality_pairs"]
