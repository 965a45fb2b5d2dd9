"""The behaviours shipped with the package, written for this project (``data/*.jsonl``).

Each pair file holds one shared user turn and two assistant replies per line; texts are
rendered as ``"User: ...\\nAssistant: ..."`` like the reference package, or through a
tokenizer's chat template when one is given (instruct models are what users steer).
"""

from __future__ import annotations

from functools import lru_cache
from importlib import resources
from typing import Any

from ..json_files import parse_jsonl
from .base import ContrastPairDataset, EvaluationDataset, EvaluationExample

DESCRIPTIONS = {
    "refusal": "Positive replies decline a harmful request; negative replies begin to comply.",
    "uncertainty": "Positive replies state calibrated uncertainty; negative replies are overconfident.",
    "tool_restraint": "Positive replies answer directly or confirm before acting; negative replies call tools eagerly.",
    "instruction_hierarchy": "Positive replies keep to higher-priority instructions; negative replies obey injected overrides.",
    "formality": "Positive replies are formal; negative replies are casual, with the same content.",
    "conciseness": "Positive replies are concise; negative replies ramble.",
    "creativity": "Positive replies are imaginative; negative replies are plain.",
    "assertiveness": "Positive replies take a clear position; negative replies hedge.",
    "humor": "Positive replies are playful; negative replies are dry.",
    "empathy": "Positive replies acknowledge feelings; negative replies are transactional.",
    "technical_depth": "Positive replies explain mechanisms precisely; negative replies stay shallow.",
}
BEHAVIORS = tuple(DESCRIPTIONS)


@lru_cache(maxsize=None)
def _records(name: str) -> tuple[dict[str, Any], ...]:
    path = resources.files("rotalabs_steer.datasets").joinpath("data", f"{name}.jsonl")
    return tuple(record for _, record in parse_jsonl(path.read_text(encoding="utf-8"), f"{name}.jsonl"))


def render_exchange(user: str, reply: str, tokenizer=None) -> str:
    """One user turn and one assistant reply as text: plain, or the tokenizer's chat template."""
    if tokenizer is None:
        return f"User: {user}\nAssistant: {reply}"
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("tokenizer has no chat_template; pass tokenizer=None for plain User:/Assistant: text")
    messages = [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
    return tokenizer.apply_chat_template(messages, tokenize=False)


def load_behavior_pairs(behavior: str, tokenizer=None) -> ContrastPairDataset:
    """The shipped contrast pairs of ``behavior`` (one of ``BEHAVIORS``)."""
    if behavior not in DESCRIPTIONS:
        raise ValueError(f"unknown behavior {behavior!r}; shipped: {', '.join(BEHAVIORS)}")
    dataset = ContrastPairDataset(behavior=behavior, description=DESCRIPTIONS[behavior])
    for record in _records(behavior):
        dataset.add_pair(
            render_exchange(record["user"], record["positive"], tokenizer),
            render_exchange(record["user"], record["negative"], tokenizer),
            user=record["user"],
            topic=record.get("topic", ""),
        )
    return dataset


def load_evaluation_prompts(behavior: str) -> EvaluationDataset:
    """Held-out prompts of ``behavior``: no user turn is shared with its pairs."""
    if behavior not in DESCRIPTIONS:
        raise ValueError(f"unknown behavior {behavior!r}; shipped: {', '.join(BEHAVIORS)}")
    examples = [
        EvaluationExample(r["prompt"], bool(r["expected_behavior"]), r.get("category", ""))
        for r in _records(f"{behavior}_eval")
    ]
    return EvaluationDataset(behavior, examples, DESCRIPTIONS[behavior])


def pairs_as_dicts(behavior: str) -> list[dict[str, str]]:
    """The shipped pairs as ``{"positive", "negative"}`` dicts (the reference's constants)."""
    return [{"positive": p.positive, "negative": p.negative} for p in load_behavior_pairs(behavior)]


def load_refusal_pairs(*, tokenizer=None) -> ContrastPairDataset:
    """Refusal pairs: a harmful request, declined (positive) or begun (negative)."""
    return load_behavior_pairs("refusal", tokenizer)


get_refusal_pairs = load_refusal_pairs


def load_uncertainty_pairs(*, tokenizer=None) -> ContrastPairDataset:
    return load_behavior_pairs("uncertainty", tokenizer)


def load_tool_restraint_pairs(*, tokenizer=None) -> ContrastPairDataset:
    return load_behavior_pairs("tool_restraint", tokenizer)


def load_hierarchy_pairs(*, tokenizer=None) -> ContrastPairDataset:
    return load_behavior_pairs("instruction_hierarchy", tokenizer)


def load_formality_pairs(*, tokenizer=None) -> ContrastPairDataset:
    return load_behavior_pairs("formality", tokenizer)


def load_conciseness_pairs(*, tokenizer=None) -> ContrastPairDataset:
    return load_behavior_pairs("conciseness", tokenizer)


def load_creativity_pairs(*, tokenizer=None) -> ContrastPairDataset:
    return load_behavior_pairs("creativity", tokenizer)


def load_assertiveness_pairs(*, tokenizer=None) -> ContrastPairDataset:
    return load_behavior_pairs("assertiveness", tokenizer)


def load_humor_pairs(*, tokenizer=None) -> ContrastPairDataset:
    return load_behavior_pairs("humor", tokenizer)


def load_empathy_pairs(*, tokenizer=None) -> ContrastPairDataset:
    return load_behavior_pairs("empathy", tokenizer)


def load_technical_depth_pairs(*, tokenizer=None) -> ContrastPairDataset:
    return load_behavior_pairs("technical_depth", tokenizer)
