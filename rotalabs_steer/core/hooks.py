"""Reference import path ``rotalabs_steer.core.hooks``."""

from ..hooks import ActivationCache, ActivationHook, extract_activations

__all__ = ["ActivationCache", "ActivationHook", "extract_activations"]
