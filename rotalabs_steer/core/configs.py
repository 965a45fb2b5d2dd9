"""Reference import path ``rotalabs_steer.core.configs``."""

from ..configs import MODEL_CONFIGS, ModelConfig, get_model_config, infer_model_config

__all__ = ["MODEL_CONFIGS", "ModelConfig", "get_model_config", "infer_model_config"]
