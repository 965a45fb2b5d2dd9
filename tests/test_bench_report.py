"""bench/report.py: RESULTS.md keeps the sections other benchmark scripts wrote."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import report  # noqa: E402


def test_replace_section_replaces_in_place_or_appends(tmp_path):
    md = tmp_path / "RESULTS.md"
    md.write_text("# Title\n\nintro\n\n## A\n\nold a\n\n## B\n\nb\n")
    report.replace_section(md, "## A", "## A\n\nnew a\n")
    assert md.read_text() == "# Title\n\nintro\n\n## A\n\nnew a\n\n## B\n\nb\n"
    report.replace_section(md, "## C", "## C\n\nc")
    assert md.read_text().endswith("## B\n\nb\n\n## C\n\nc\n")
    fresh = tmp_path / "new.md"
    report.replace_section(fresh, "## A", "## A\n\na\n")
    assert fresh.read_text() == "## A\n\na\n"
    # a file that starts with a section, twice: still one of each
    headed = tmp_path / "headed.md"
    headed.write_text("## A\na\n\n## AB\nab\n")
    for _ in range(2):
        report.replace_section(headed, "## A", "## A\nnew\n")
    assert headed.read_text() == "## A\nnew\n\n## AB\nab\n"
    with pytest.raises(ValueError, match="heading"):
        report.replace_section(headed, "## A", "## B\nwrong\n")


def test_render_keeps_other_scripts_sections_and_skips_their_json(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    (results / "steering.json").write_text(json.dumps({"add": [1.0]}))  # another script's JSON: no "section"
    md = tmp_path / "RESULTS.md"
    md.write_text("# Extraction benchmark\n\nold header\n\n## Shared prefixes (issue 16)\n\ntable\n")
    report.render(results, md, tmp_path / "results.png")
    text = md.read_text()
    assert "old header" not in text  # the generated part is rewritten
    assert text.count("## Shared prefixes (issue 16)") == 1 and text.endswith("## Shared prefixes (issue 16)\n\ntable\n")
