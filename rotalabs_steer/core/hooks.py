"""Reference import path ``rotalabs_steer.core.hooks``."""

from ..activations import ActivationCache, ActivationHook, extract_activations

__all__ = ["ActivationCache", "ActivationHook", "extract_activations"]
