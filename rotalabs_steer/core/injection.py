"""Reference import path ``rotalabs_steer.core.injection``."""

from ..steering import ActivationInjector, MultiVectorInjector

__all__ = ["ActivationInjector", "MultiVectorInjector"]
