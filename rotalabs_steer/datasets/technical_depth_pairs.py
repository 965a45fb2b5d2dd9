"""Reference import path ``rotalabs_steer.datasets.technical_depth_pairs``: this package's own
technical depth pairs (``data/technical_depth.jsonl``), as ``{"positive", "negative"}`` dicts."""

from .base import ContrastPair, ContrastPairDataset
from .builtin import load_technical_depth_pairs, pairs_as_dicts

TECHNICAL_DEPTH_PAIRS = pairs_as_dicts("technical_depth")

__all__ = ["ContrastPair", "ContrastPairDataset", "TECHNICAL_DEPTH_PAIRS", "load_technical_depth_pairs"]
