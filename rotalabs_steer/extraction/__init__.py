"""Steering-vector extraction: the documented ``rotalabs_steer.extraction`` API.

The pipeline, in order: ``batching`` (tokenize, bucket by length, pad), ``forward`` (one
hooked forward per batch, stopped after the deepest block; the C core reduces rows),
``separation`` (held-out figures from per-fold sums), ``distributed`` (all-reduce of the
float64 state); ``caa`` orchestrates them and makes the vectors.
"""

from .base import CAA, ExtractionMethod
from .caa import extract_caa_vector, extract_caa_vectors

__all__ = ["CAA", "ExtractionMethod", "extract_caa_vector", "extract_caa_vectors"]
