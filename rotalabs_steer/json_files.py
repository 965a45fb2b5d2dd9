"""Reading and writing the package's JSON and JSONL files: every error names the file (and line)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def write_json(path: str | Path, data: Any) -> None:
    """``data`` as indented UTF-8 JSON at ``path``, creating its folder; NaN / inf are refused
    (JSON has none: a reader would fail on them)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, ensure_ascii=False, allow_nan=False)


def read_text(path: Path) -> str:
    """The UTF-8 text of ``path``; a ValueError naming it when it is not text or is empty."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e})") from None
    if not text.strip():
        raise ValueError(f"{path}: file is empty")
    return text


def read_json(path: Path, missing: str | None = None) -> Any:
    """The JSON value in ``path``. ``missing``: the FileNotFoundError message if it does not exist."""
    try:
        text = path.read_text(encoding="utf-8")
        return json.loads(text)
    except FileNotFoundError:
        if missing is None:
            raise
        raise FileNotFoundError(missing) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def read_json_object(path: Path, missing: str | None = None) -> dict[str, Any]:
    """A JSON object from ``path`` (see ``read_json``), or a ValueError naming the file."""
    value = read_json(path, missing)
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return value


def parse_jsonl(text: str, where: str) -> list[tuple[str, Any]]:
    """``[(where line N, value)]`` for each non-blank line of JSONL ``text``."""
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append((f"{where} line {number}", json.loads(line)))
        except json.JSONDecodeError as e:
            raise ValueError(f"{where} line {number}: not valid JSON ({e})") from None
    return records
