"""Contrast pairs and evaluation prompts: the reference's classes and file layout."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from ..json_files import read_json, write_json


@dataclass
class ContrastPair:
    """Two texts that differ in one behaviour: ``positive`` shows it, ``negative`` does not."""

    positive: str
    negative: str
    metadata: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        for side in ("positive", "negative"):
            value = getattr(self, side)
            if not isinstance(value, str):
                raise TypeError(f"ContrastPair.{side} must be a str, not {type(value).__name__}")
            if not value.strip():
                raise ValueError(f"ContrastPair.{side} is empty; need both positive and negative texts")


class ContrastPairDataset:
    """Contrast pairs for one behaviour."""

    def __init__(self, behavior: str, pairs: list[ContrastPair] | None = None, description: str = ""):
        self.behavior = behavior
        self.description = description
        self._pairs: list[ContrastPair] = list(pairs) if pairs else []

    def add(self, pair: ContrastPair) -> None:
        if not isinstance(pair, ContrastPair):
            raise TypeError(f"pair must be a ContrastPair, not {type(pair).__name__}")
        self._pairs.append(pair)

    def add_pair(self, positive: str, negative: str, **metadata: Any) -> None:
        """Add a pair from its two texts."""
        self._pairs.append(ContrastPair(positive, negative, metadata))

    @property
    def positives(self) -> list[str]:
        return [p.positive for p in self._pairs]

    @property
    def negatives(self) -> list[str]:
        return [p.negative for p in self._pairs]

    def save(self, path: str | Path) -> None:
        """Write the reference JSON layout: behavior, description, pairs."""
        write_json(path, {
            "behavior": self.behavior,
            "description": self.description,
            "pairs": [{"positive": p.positive, "negative": p.negative, "metadata": p.metadata} for p in self._pairs],
        })

    @classmethod
    def load(cls, path: str | Path) -> ContrastPairDataset:
        """Read the reference JSON layout; a bad record is named with its file and index."""
        path = Path(path)
        data = read_json(path)
        if not isinstance(data, dict) or not isinstance(data.get("pairs"), list):
            raise ValueError(f"{path}: expected an object with a 'pairs' list")
        pairs = [_pair_from_record(record, f"{path}: pair {i}") for i, record in enumerate(data["pairs"])]
        return cls(behavior=str(data.get("behavior", "unknown")), pairs=pairs,
                   description=str(data.get("description", "")))

    def __len__(self) -> int:
        return len(self._pairs)

    def __iter__(self) -> Iterator[ContrastPair]:
        return iter(self._pairs)

    def __getitem__(self, index: int) -> ContrastPair:
        return self._pairs[index]

    def __repr__(self) -> str:
        return f"ContrastPairDataset(behavior={self.behavior!r}, pairs={len(self)})"


def _pair_from_record(record: Any, where: str) -> ContrastPair:
    if isinstance(record, ContrastPair):
        return record
    if not isinstance(record, dict):
        raise TypeError(f"{where}: expected a dict with 'positive' and 'negative', got {type(record).__name__}")
    missing = [k for k in ("positive", "negative") if k not in record]
    if missing:
        raise ValueError(f"{where}: missing {' and '.join(repr(k) for k in missing)}")
    metadata = record.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise TypeError(f"{where}: 'metadata' must be a dict")
    try:
        return ContrastPair(record["positive"], record["negative"], dict(metadata))
    except (TypeError, ValueError) as e:
        raise type(e)(f"{where}: {e}") from None


def as_contrast_pairs(contrast_pairs: Any) -> tuple[str, list[ContrastPair]]:
    """(behavior, pairs) from a ContrastPairDataset or any iterable of dicts / ContrastPairs."""
    if isinstance(contrast_pairs, ContrastPairDataset):
        # The constructor takes its list as given: check the entries here, as for a list.
        return contrast_pairs.behavior, [
            _pair_from_record(r, f"contrast_pairs[{i}]") for i, r in enumerate(contrast_pairs)
        ]
    if isinstance(contrast_pairs, (str, bytes, dict)) or not isinstance(contrast_pairs, Iterable):
        raise TypeError(
            "contrast_pairs must be a ContrastPairDataset or a list of "
            f"{{'positive': str, 'negative': str}} dicts, not {type(contrast_pairs).__name__}"
        )
    pairs = [_pair_from_record(r, f"contrast_pairs[{i}]") for i, r in enumerate(contrast_pairs)]
    return "unknown", pairs


@dataclass
class EvaluationExample:
    """A held-out prompt, and whether the behaviour should show in the reply."""

    prompt: str
    expected_behavior: bool
    category: str = ""
    metadata: dict = field(default_factory=dict)


class EvaluationDataset:
    """Held-out prompts for measuring a behaviour under steering."""

    def __init__(self, behavior: str, examples: list[EvaluationExample] | None = None, description: str = ""):
        self.behavior = behavior
        self.description = description
        self._examples: list[EvaluationExample] = list(examples) if examples else []

    def add(self, example: EvaluationExample) -> None:
        self._examples.append(example)

    def add_example(self, prompt: str, expected_behavior: bool, category: str = "", **metadata: Any) -> None:
        self._examples.append(EvaluationExample(prompt, expected_behavior, category, metadata))

    @property
    def positive_examples(self) -> list[EvaluationExample]:
        return [e for e in self._examples if e.expected_behavior]

    @property
    def negative_examples(self) -> list[EvaluationExample]:
        return [e for e in self._examples if not e.expected_behavior]

    def save(self, path: str | Path) -> None:
        write_json(path, {
            "behavior": self.behavior,
            "description": self.description,
            "examples": [
                {"prompt": e.prompt, "expected_behavior": e.expected_behavior, "category": e.category,
                 "metadata": e.metadata}
                for e in self._examples
            ],
        })

    @classmethod
    def load(cls, path: str | Path) -> EvaluationDataset:
        path = Path(path)
        data = read_json(path)
        if not isinstance(data, dict) or not isinstance(data.get("examples"), list):
            raise ValueError(f"{path}: expected an object with an 'examples' list")
        examples = []
        for i, e in enumerate(data["examples"]):
            if not isinstance(e, dict) or not isinstance(e.get("prompt"), str) or not isinstance(
                e.get("expected_behavior"), bool
            ):
                raise ValueError(f"{path}: example {i} needs 'prompt' (str) and 'expected_behavior' (bool)")
            examples.append(EvaluationExample(e["prompt"], e["expected_behavior"], str(e.get("category", "")),
                                              dict(e.get("metadata") or {})))
        return cls(str(data.get("behavior", "unknown")), examples, str(data.get("description", "")))

    def __len__(self) -> int:
        return len(self._examples)

    def __iter__(self) -> Iterator[EvaluationExample]:
        return iter(self._examples)

    def __getitem__(self, index: int) -> EvaluationExample:
        return self._examples[index]
