"""Reference import path ``rotalabs_steer.datasets.tool_pairs``: this package's own
tool restraint pairs (``data/tool_restraint.jsonl``), as ``{"positive", "negative"}`` dicts."""

from .base import ContrastPair, ContrastPairDataset
from .builtin import load_tool_restraint_pairs, pairs_as_dicts

TOOL_RESTRAINT_PAIRS = pairs_as_dicts("tool_restraint")

__all__ = ["ContrastPair", "ContrastPairDataset", "TOOL_RESTRAINT_PAIRS", "load_tool_restraint_pairs"]
