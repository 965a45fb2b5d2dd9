"""Contrast-pair datasets: the reference's classes, shipped behaviours, and loaders."""

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

# The reference's module-level constants, built on first access.
_CONSTANTS = {
    "HIERARCHY_PAIRS": "instruction_hierarchy",
    "TOOL_RESTRAINT_PAIRS": "tool_restraint",
    "UNCERTAINTY_PAIRS": "uncertainty",
    "FORMALITY_PAIRS": "formality",
    "CONCISENESS_PAIRS": "conciseness",
    "CREATIVITY_PAIRS": "creativity",
    "ASSERTIVENESS_PAIRS": "assertiveness",
    "HUMOR_PAIRS": "humor",
    "EMPATHY_PAIRS": "empathy",
    "TECHNICAL_DEPTH_PAIRS": "technical_depth",
}


def __getattr__(name: str):
    if name in _CONSTANTS:
        return pairs_as_dicts(_CONSTANTS[name])
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
