"""Progress bars follow show_progress, tqdm's TQDM_DISABLE and transformers' switch."""

from __future__ import annotations

import pytest
from transformers.utils import logging as hf_logging

from rotalabs_steer.extraction import extract_caa_vector
from rotalabs_steer.progress import progress_bar
from tiny_models import make_model, make_tokenizer, refusal_pairs


@pytest.mark.parametrize("env, hf_enabled, show, shown", [
    ({}, True, True, True),
    ({}, True, False, False),
    ({"TQDM_DISABLE": "1"}, True, True, False),
    ({"TQDM_DISABLE": "0"}, True, True, True),
    ({}, False, True, False),
])
def test_bar_is_shown_only_when_nothing_turned_bars_off(monkeypatch, env, hf_enabled, show, shown):
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    (hf_logging.enable_progress_bar if hf_enabled else hf_logging.disable_progress_bar)()
    try:
        with progress_bar(total=2, show=show) as bar:
            assert bar.disable is (not shown)
    finally:
        hf_logging.enable_progress_bar()


def test_extraction_bar_honours_tqdm_disable(monkeypatch, capsys):
    model, tokenizer = make_model("llama"), make_tokenizer()
    monkeypatch.setenv("TQDM_DISABLE", "1")
    extract_caa_vector(model, tokenizer, refusal_pairs(2), 1)
    assert "text" not in capsys.readouterr().err
    monkeypatch.delenv("TQDM_DISABLE")
    extract_caa_vector(model, tokenizer, refusal_pairs(2), 1)
    assert "CAA layers [1]" in capsys.readouterr().err
