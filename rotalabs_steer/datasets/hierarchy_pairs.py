"""Reference import path ``rotalabs_steer.datasets.hierarchy_pairs``: this package's own
instruction hierarchy pairs (``data/instruction_hierarchy.jsonl``), as ``{"positive", "negative"}`` dicts."""

from .base import ContrastPair, ContrastPairDataset
from .builtin import load_hierarchy_pairs, pairs_as_dicts

HIERARCHY_PAIRS = pairs_as_dicts("instruction_hierarchy")

__all__ = ["ContrastPair", "ContrastPairDataset", "HIERARCHY_PAIRS", "load_hierarchy_pairs"]
