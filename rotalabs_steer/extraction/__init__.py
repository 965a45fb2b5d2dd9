"""Steering-vector extraction: the documented ``rotalabs_steer.extraction`` API."""

from .caa import extract_caa_vector, extract_caa_vectors

__all__ = ["extract_caa_vector", "extract_caa_vectors"]
