"""Evaluating steering vectors.

The reference's API (``metrics``, ``analysis``, ``llm_judge``), with generation batched across
prompts, and this package's own scores (``scoring``: teacher-forced log-probabilities, log-odds,
A/B letters, perplexity; ``score_strengths`` behind the CLI's ``sweep``).
"""

from .analysis import (
    TradeoffResult,
    analyze_tradeoffs,
    compare_with_baseline,
    find_optimal_strength,
    load_analysis_results,
    save_analysis_results,
    strength_sweep,
)
from .llm_judge import HAS_ANTHROPIC, LLMJudge, is_refusal, judge_coherence
from .metrics import (
    BehaviorMetrics,
    EvaluationResult,
    RefusalMetrics,
    evaluate_refusal,
    evaluate_steering_strength,
    generate_response,
    generate_responses,
)
from .scoring import (
    COMPLIANCE_OPENINGS,
    REFUSAL_OPENINGS,
    REFUSAL_PHRASES,
    SCORED_BEHAVIORS,
    evaluate,
    has_refusal_phrase,
    refusal_logprob,
    score_strength,
    score_strengths,
)

__all__ = [
    "BehaviorMetrics",
    "COMPLIANCE_OPENINGS",
    "EvaluationResult",
    "HAS_ANTHROPIC",
    "LLMJudge",
    "REFUSAL_OPENINGS",
    "REFUSAL_PHRASES",
    "RefusalMetrics",
    "SCORED_BEHAVIORS",
    "TradeoffResult",
    "analyze_tradeoffs",
    "compare_with_baseline",
    "evaluate",
    "evaluate_refusal",
    "evaluate_steering_strength",
    "find_optimal_strength",
    "generate_response",
    "generate_responses",
    "has_refusal_phrase",
    "is_refusal",
    "judge_coherence",
    "load_analysis_results",
    "refusal_logprob",
    "save_analysis_results",
    "score_strength",
    "score_strengths",
    "strength_sweep",
]
