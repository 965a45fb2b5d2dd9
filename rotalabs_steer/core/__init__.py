"""The reference's ``rotalabs_steer.core`` import paths, kept so existing code runs unchanged."""

from ..configs import MODEL_CONFIGS, ModelConfig, get_model_config, infer_model_config
from ..activations import ActivationCache, ActivationHook, extract_activations
from ..steering import ActivationInjector, MultiVectorInjector
from ..vectors import SteeringVector, SteeringVectorSet

__all__ = [
    "ActivationCache",
    "ActivationHook",
    "ActivationInjector",
    "MODEL_CONFIGS",
    "ModelConfig",
    "MultiVectorInjector",
    "SteeringVector",
    "SteeringVectorSet",
    "extract_activations",
    "get_model_config",
    "infer_model_config",
]
