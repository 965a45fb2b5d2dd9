"""rotalabs_steer: steering vectors for HuggingFace language models.

A drop-in for the documented ``rotalabs_steer`` API whose extraction runs one batched
forward for all layers and reduces block outputs in C (``rotalabs_steer._core``).
"""

from .configs import MODEL_CONFIGS, ModelConfig, get_model_config, infer_model_config
from .steering import ActivationInjector, MultiVectorInjector
from .vectors import SteeringVector, SteeringVectorSet

__version__ = "2.0.0.dev0"

__all__ = [
    "ActivationInjector",
    "MultiVectorInjector",
    "MODEL_CONFIGS",
    "ModelConfig",
    "SteeringVector",
    "SteeringVectorSet",
    "__version__",
    "get_model_config",
    "infer_model_config",
]
