"""rotalabs_steer: steering vectors for HuggingFace language models.

A drop-in for the documented ``rotalabs_steer`` API whose extraction runs one batched
forward for all layers and reduces block outputs in C (``rotalabs_steer._core``).
"""

try:
    from . import _core  # the compiled C core: everything below needs it
except ImportError as _error:
    import pathlib as _pathlib

    _here = _pathlib.Path(__file__).resolve().parent
    if not any(_here.glob("_core*.so")) and not any(_here.glob("_core*.pyd")):
        raise ImportError(
            f"rotalabs_steer was imported from {_here}, a source tree without a compiled C core "
            "(rotalabs_steer._core). It shadows any installed copy when Python runs from the "
            "repository root. Build the core in place with `make build` (or `python setup.py "
            "build_ext --inplace`), or run from outside the source tree to use the installed package."
        ) from _error
    raise ImportError(f"rotalabs_steer's compiled C core in {_here} failed to load: {_error}; rebuild it "
                      "(`make build`, or reinstall with `pip install --force-reinstall .`)") from _error

from ._version import __version__
from .activations import ActivationCache, ActivationHook, extract_activations
from .conditions import SteeringCondition, find_condition_threshold
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
    "SteeringCondition",
    "SteeringVector",
    "SteeringVectorSet",
    "__version__",
    "extract_activations",
    "find_condition_threshold",
    "get_model_config",
    "infer_model_config",
]
