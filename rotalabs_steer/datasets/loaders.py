"""Contrast pairs from the user's own files: plain pairs (JSON or JSONL) and CAA A/B questions.

Every error names its source and record (``"pairs.jsonl line 3: ..."``, ``"pairs.json record 2: ..."``,
``"source[4]: ..."``), so a bad line in a large file can be found.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from ..json_files import parse_jsonl, read_text
from .base import ContrastPair, ContrastPairDataset, _pair_from_record
from .builtin import render_exchange

CAA_DESCRIPTION = "CAA A/B multiple-choice pairs: positive ends with the matching answer, negative with the other."
_ANSWER = re.compile(r"\(([A-Z])\)")
_CAA_KEYS = ("question", "answer_matching_behavior", "answer_not_matching_behavior")


def load_pairs(source: str | Path | list[dict], behavior: str | None = None) -> ContrastPairDataset:
    """Contrast pairs from a file or a list of ``{"positive", "negative"}`` dicts.

    A file may hold the layout ``ContrastPairDataset.save`` writes, a JSON list of records, or
    JSONL with one record per line; the format is read from the content, whatever the suffix.
    A record with a ``"user"`` key holds one user turn and two replies, rendered with
    ``render_exchange``. Keys other than positive, negative and metadata go into the metadata.
    ``behavior`` overrides the file's own; otherwise it is the file's, or ``"unknown"``.
    """
    header, records = _read_records(source)
    pairs = [_pair_from_loaded(record, where) for where, record in records]
    return ContrastPairDataset(
        behavior=behavior or str(header.get("behavior", "unknown")),
        pairs=pairs,
        description=str(header.get("description", "")),
    )


def load_caa_ab(source: str | Path | list[dict], behavior: str = "unknown", tokenizer=None) -> ContrastPairDataset:
    """Contrast pairs from CAA A/B records (``question``, ``answer_matching_behavior``,
    ``answer_not_matching_behavior``) in a JSON list file, a JSONL file, or a list of dicts.

    Texts are ``"{question}\\n\\nAnswer: (A)"``, or with ``tokenizer`` its chat template with the
    question as the user turn and ``"(A)"`` as the assistant's reply. The template may append
    end-of-turn text, so each pair's metadata records where the answer letter sits:
    ``positive_answer_char`` / ``negative_answer_char`` (``text[i]`` is the letter), and ``question``.
    """
    _, records = _read_records(source)
    pairs = [_caa_pair(record, where, tokenizer) for where, record in records]
    return ContrastPairDataset(behavior=behavior, pairs=pairs, description=CAA_DESCRIPTION)


# --- reading records -------------------------------------------------------------------------


def _read_records(source: Any) -> tuple[dict, list[tuple[str, Any]]]:
    """(header, [(where, record)]): header holds the saved layout's behavior and description."""
    if isinstance(source, (list, tuple)):
        if not source:
            raise ValueError("source is an empty list; need at least one record")
        return {}, [(f"source[{i}]", record) for i, record in enumerate(source)]
    if not isinstance(source, (str, Path)):
        raise TypeError(f"source must be a file path or a list of dicts, not {type(source).__name__}")
    path = Path(source)
    header, records = _parse_text(read_text(path), path)
    if not records:
        raise ValueError(f"{path}: no records")
    return header, records


def _parse_text(text: str, path: Path) -> tuple[dict, list[tuple[str, Any]]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        # Several JSON values, one a line, do not parse as one document: JSONL, if its first line parses.
        first = next(line for line in text.splitlines() if line.strip())
        try:
            json.loads(first)
        except json.JSONDecodeError:
            raise ValueError(f"{path}: not valid JSON or JSONL ({e})") from None
        return {}, parse_jsonl(text, str(path))
    if isinstance(data, list):
        return {}, [(f"{path} record {i}", record) for i, record in enumerate(data)]
    if isinstance(data, dict) and "pairs" in data:
        if not isinstance(data["pairs"], list):
            raise ValueError(f"{path}: 'pairs' must be a list, not {type(data['pairs']).__name__}")
        return data, [(f"{path} pair {i}", record) for i, record in enumerate(data["pairs"])]
    if isinstance(data, dict) and len(text.strip().splitlines()) == 1:
        return {}, parse_jsonl(text, str(path))  # JSONL with a single line
    raise ValueError(
        f"{path}: expected an object with a 'pairs' list, a JSON list of records, or JSONL; "
        f"got {type(data).__name__}"
    )


def _pair_from_loaded(record: Any, where: str) -> ContrastPair:
    pair = _pair_from_record(record, where)
    if not isinstance(record, dict):
        return pair
    extra = {k: v for k, v in record.items() if k not in ("positive", "negative", "metadata")}
    metadata = {**pair.metadata, **extra}
    if "user" not in record:
        return ContrastPair(pair.positive, pair.negative, metadata)
    user = _text_field(record, "user", where)
    return ContrastPair(render_exchange(user, pair.positive), render_exchange(user, pair.negative), metadata)


def _text_field(record: dict, key: str, where: str) -> str:
    if key not in record:
        raise ValueError(f"{where}: missing {key!r}")
    value = record[key]
    if not isinstance(value, str):
        raise TypeError(f"{where}: {key!r} must be a str, not {type(value).__name__}")
    if not value.strip():
        raise ValueError(f"{where}: {key!r} is empty")
    return value


# --- CAA A/B records ---------------------------------------------------------------------------


def _caa_pair(record: Any, where: str, tokenizer) -> ContrastPair:
    if not isinstance(record, dict):
        raise TypeError(f"{where}: expected a dict with {', '.join(map(repr, _CAA_KEYS))}, "
                        f"got {type(record).__name__}")
    question, matching, not_matching = (_text_field(record, key, where) for key in _CAA_KEYS)
    letters = [_answer_letter(answer, key, question, where)
               for answer, key in ((matching, _CAA_KEYS[1]), (not_matching, _CAA_KEYS[2]))]
    if letters[0] == letters[1]:
        raise ValueError(f"{where}: both answers are ({letters[0]}); they must differ")
    positive, negative = (_render_caa(question, letter, tokenizer) for letter in letters)
    index = _answer_index(positive, negative, letters, where)
    return ContrastPair(positive, negative, {
        "question": question, "positive_answer_char": index, "negative_answer_char": index,
    })


def _answer_letter(answer: str, key: str, question: str, where: str) -> str:
    """The letter of an answer like "(A)" or " (B)", checked against the question's options."""
    match = _ANSWER.fullmatch(answer.strip())
    if not match:
        raise ValueError(f"{where}: {key} {answer!r} is not one capital letter in parentheses, like '(A)'")
    if match.group(0) not in question:
        raise ValueError(f"{where}: {key} is {match.group(0)} but the question has no option {match.group(0)}")
    return match.group(1)


def _render_caa(question: str, letter: str, tokenizer) -> str:
    if tokenizer is None:
        return f"{question}\n\nAnswer: ({letter})"
    return render_exchange(question, f"({letter})", tokenizer)


def _answer_index(positive: str, negative: str, letters: list[str], where: str) -> int:
    """Index of the answer letter, the same in both texts.

    Both texts render the same question and differ only in the letter, so the first differing
    character is the letter, wherever the chat template put the reply and whatever followed it.
    """
    index = next((i for i, (p, n) in enumerate(zip(positive, negative)) if p != n), None)
    if (index is None or len(positive) != len(negative) or positive[index + 1:] != negative[index + 1:]
            or (positive[index], negative[index]) != tuple(letters)
            or positive[index - 1:index] != "(" or positive[index + 1:index + 2] != ")"):
        raise ValueError(f"{where}: the rendered texts do not differ only in the answer letter; "
                         "does the chat template keep the assistant reply verbatim?")
    return index
