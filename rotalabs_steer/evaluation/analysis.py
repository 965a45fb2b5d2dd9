"""The reference's sweep and trade-off analysis, with generation batched across prompts.

Rates are the reference's; ``avg_latency_ms`` / ``latency_ms`` are the wall time of the
batched generation divided by the number of prompts (per-sample average, not per-prompt
latency: a lone prompt takes longer than its share of a batch).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..json_files import read_json_object, write_json
from .llm_judge import _heuristic_coherence
from .metrics import (
    DEFAULT_BATCH_SIZE,
    _check_callable,
    _prompt_list,
    _strength_list,
    rate,
    steered_responses,
)


@dataclass
class TradeoffResult:
    """Scores of one strength in ``analyze_tradeoffs``."""

    strength: float
    target_behavior_rate: float
    false_positive_rate: float
    coherence_score: float
    helpfulness_score: float
    latency_ms: float
    num_samples: int

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_TRADEOFF_FIELDS = tuple(f.name for f in dataclasses.fields(TradeoffResult))


def strength_sweep(model, tokenizer, steering_vector, test_prompts: list[str],
                   is_target_behavior_fn: Callable[[str], bool], strengths: list[float] = None,
                   show_progress: bool = True, *, batch_size: int = DEFAULT_BATCH_SIZE) -> list[dict[str, Any]]:
    """One row per strength: ``strength``, ``behavior_rate`` (fraction of responses for which
    ``is_target_behavior_fn`` holds), ``avg_latency_ms`` and ``num_samples``. Strength 0 is unsteered."""
    prompts = _prompt_list(test_prompts, "test_prompts")
    _check_callable(is_target_behavior_fn, "is_target_behavior_fn")
    rows = []
    for strength in _strength_list(strengths, (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0)):
        responses, elapsed_ms = steered_responses(
            model, tokenizer, steering_vector, strength, prompts, batch_size=batch_size,
            show_progress=show_progress, desc="Baseline" if strength == 0.0 else f"Strength {strength}")
        rows.append({"strength": strength,
                     "behavior_rate": rate([is_target_behavior_fn(r) for r in responses], len(prompts)),
                     "avg_latency_ms": elapsed_ms / len(prompts) if prompts else 0.0,
                     "num_samples": len(prompts)})
    return rows


def analyze_tradeoffs(model, tokenizer, steering_vector, target_prompts: list[str], control_prompts: list[str],
                      is_target_behavior_fn: Callable[[str], bool],
                      coherence_fn: Callable[[str], float] | None = None,
                      helpfulness_fn: Callable[[str, str], float] | None = None, strengths: list[float] = None,
                      show_progress: bool = True, system_prompt: str | None = None, *,
                      batch_size: int = DEFAULT_BATCH_SIZE) -> list[TradeoffResult]:
    """Per strength: the behaviour rate on ``target_prompts`` (wanted), on ``control_prompts`` (false
    positives), mean coherence over all responses (``coherence_fn``, default a heuristic), mean
    ``helpfulness_fn(prompt, response)`` over control prompts (0 without one), and latency."""
    target = _prompt_list(target_prompts, "target_prompts")
    control = _prompt_list(control_prompts, "control_prompts")
    _check_callable(is_target_behavior_fn, "is_target_behavior_fn")
    coherence_fn = _heuristic_coherence if coherence_fn is None else _check_callable(coherence_fn, "coherence_fn")
    if helpfulness_fn is not None:
        _check_callable(helpfulness_fn, "helpfulness_fn")
    total = len(target) + len(control)
    results = []
    for strength in _strength_list(strengths, (0.0, 0.5, 1.0, 1.5, 2.0)):
        responses, elapsed_ms = steered_responses(
            model, tokenizer, steering_vector, strength, target + control, batch_size=batch_size,
            show_progress=show_progress, desc=f"Strength {strength}", system_prompt=system_prompt)
        shows = [bool(is_target_behavior_fn(r)) for r in responses]
        coherence = sum(coherence_fn(r) for r in responses)
        helpfulness = (sum(helpfulness_fn(p, r) for p, r in zip(control, responses[len(target):]))
                       if helpfulness_fn is not None and control else 0.0)
        results.append(TradeoffResult(
            strength=strength,
            target_behavior_rate=rate(shows[:len(target)], len(target)),
            false_positive_rate=rate(shows[len(target):], len(control)),
            coherence_score=coherence / total if total else 0.0,
            helpfulness_score=helpfulness / len(control) if helpfulness_fn is not None and control else 0.0,
            latency_ms=elapsed_ms / total if total else 0.0,
            num_samples=total))
    return results


def find_optimal_strength(results: list[TradeoffResult], min_target_rate: float = 0.9,
                          max_false_positive_rate: float = 0.1, min_coherence: float = 0.7) -> float | None:
    """The lowest strength meeting all three limits, or None when none does."""
    valid = [r.strength for r in results
             if r.target_behavior_rate >= min_target_rate and r.false_positive_rate <= max_false_positive_rate
             and r.coherence_score >= min_coherence]
    return min(valid) if valid else None


def save_analysis_results(results: list[TradeoffResult], path: Path, metadata: dict[str, Any] | None = None) -> None:
    """``{"results": [...], "metadata": {...}}`` as indented JSON at ``path`` (folders created)."""
    for i, result in enumerate(results):
        if not isinstance(result, TradeoffResult):
            raise TypeError(f"results[{i}] must be a TradeoffResult, not {type(result).__name__}")
    if metadata is not None and not isinstance(metadata, dict):
        raise TypeError(f"metadata must be a dict or None, not {type(metadata).__name__}")
    write_json(path, {"results": [r.to_dict() for r in results], "metadata": metadata or {}})


def load_analysis_results(path: Path) -> list[TradeoffResult]:
    """The ``TradeoffResult``s in a file written by ``save_analysis_results``."""
    path = Path(path)
    records = read_json_object(path).get("results")
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a 'results' list")
    results = []
    for i, record in enumerate(records):
        if not isinstance(record, dict) or set(record) != set(_TRADEOFF_FIELDS):
            raise ValueError(f"{path}: results[{i}] must have exactly the keys {list(_TRADEOFF_FIELDS)}")
        results.append(TradeoffResult(**record))
    return results


def compare_with_baseline(steered_results: list[TradeoffResult], baseline_rate: float,
                          baseline_false_positive: float = 0.0) -> dict[str, Any]:
    """Each strength's rates next to a baseline's (e.g. prompting instead of steering)."""
    return {
        "baseline": {"target_rate": baseline_rate, "false_positive_rate": baseline_false_positive},
        "by_strength": [{"strength": r.strength, "target_rate": r.target_behavior_rate,
                         "improvement_over_baseline": r.target_behavior_rate - baseline_rate,
                         "false_positive_rate": r.false_positive_rate,
                         "fp_increase": r.false_positive_rate - baseline_false_positive}
                        for r in steered_results],
    }
