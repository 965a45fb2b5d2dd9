"""Steering-vector extraction: the documented ``rotalabs_steer.extraction`` API.

The pipeline, in order: ``batching`` (tokenize, bucket by length, pad), ``forward`` (one
hooked forward per batch, stopped after the deepest block; the C core reduces rows),
``separation`` (held-out figures from per-fold sums), ``distributed`` (all-reduce of the
float64 state), ``statistics`` (per-layer sums and pair moments, ``PairStatistics``),
``methods`` (directions from the moments); ``caa`` orchestrates them.
"""

from .base import CAA, PCA, ExtractionMethod, Fisher, PCADiff
from .caa import collect_pair_statistics, extract_caa_vector, extract_caa_vectors, extract_vectors
from .statistics import METHODS, PairStatistics

__all__ = ["CAA", "PCA", "PCADiff", "Fisher", "ExtractionMethod", "METHODS", "PairStatistics",
           "collect_pair_statistics", "extract_caa_vector", "extract_caa_vectors", "extract_vectors"]
