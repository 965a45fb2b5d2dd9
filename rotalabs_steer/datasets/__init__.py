"""Contrast-pair datasets: the reference's classes, shipped behaviours, and loaders."""

from importlib import import_module

from .base import ContrastPair, ContrastPairDataset, EvaluationDataset, EvaluationExample
from .builtin import (
    BEHAVIORS,
    get_refusal_pairs,
    load_assertiveness_pairs,
    load_behavior_pairs,
    load_conciseness_pairs,
    load_creativity_pairs,
    load_empathy_pairs,
    load_evaluation_prompts,
    load_formality_pairs,
    load_hierarchy_pairs,
    load_humor_pairs,
    load_refusal_pairs,
    load_technical_depth_pairs,
    load_tool_restraint_pairs,
    load_uncertainty_pairs,
    pairs_as_dicts,
    render_exchange,
)
from .loaders import load_caa_ab, load_pairs

# The reference's module-level constants, from their <behaviour>_pairs submodules on first
# access (so ``datasets.HUMOR_PAIRS is datasets.humor_pairs.HUMOR_PAIRS``, as there).
_CONSTANTS = {
    "HIERARCHY_PAIRS": "hierarchy_pairs",
    "TOOL_RESTRAINT_PAIRS": "tool_pairs",
    "UNCERTAINTY_PAIRS": "uncertainty_pairs",
    "FORMALITY_PAIRS": "formality_pairs",
    "CONCISENESS_PAIRS": "conciseness_pairs",
    "CREATIVITY_PAIRS": "creativity_pairs",
    "ASSERTIVENESS_PAIRS": "assertiveness_pairs",
    "HUMOR_PAIRS": "humor_pairs",
    "EMPATHY_PAIRS": "empathy_pairs",
    "TECHNICAL_DEPTH_PAIRS": "technical_depth_pairs",
}


def __getattr__(name: str):
    if name in _CONSTANTS:
        return getattr(import_module(f"{__name__}.{_CONSTANTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "BEHAVIORS",
    "ContrastPair",
    "ContrastPairDataset",
    "EvaluationDataset",
    "EvaluationExample",
    "get_refusal_pairs",
    "load_assertiveness_pairs",
    "load_behavior_pairs",
    "load_caa_ab",
    "load_conciseness_pairs",
    "load_creativity_pairs",
    "load_empathy_pairs",
    "load_evaluation_prompts",
    "load_formality_pairs",
    "load_hierarchy_pairs",
    "load_humor_pairs",
    "load_pairs",
    "load_refusal_pairs",
    "load_technical_depth_pairs",
    "load_tool_restraint_pairs",
    "load_uncertainty_pairs",
    "pairs_as_dicts",
    "render_exchange",
    *_CONSTANTS,
]
