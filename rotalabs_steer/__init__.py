"""rotalabs_steer: steering vectors for HuggingFace language models.

A drop-in for the documented ``rotalabs_steer`` API whose extraction runs one batched
forward for all layers and reduces block outputs in C (``rotalabs_steer._core``).
"""

from ._version import __version__
from .activations import ActivationCache, ActivationHook, extract_activations
from .configs import MODEL_CONFIGS, ModelConfig, get_model_config, infer_model_config
from .steering import ActivationInjector, MultiVectorInjector
from .vectors import SteeringVector, SteeringVectorSet

__all__ = [
    "ActivationCache",
    "ActivationHook",
    "ActivationInjector",
    "MultiVectorInjector",
    "MODEL_CONFIGS",
    "ModelConfig",
    "SteeringVector",
    "SteeringVectorSet",
    "__version__",
    "extract_activations",
    "get_model_config",
    "infer_model_config",
]
