"""Shipped contrast pairs and the dataset classes."""

from __future__ import annotations

import json

import pytest

import rotalabs_steer.datasets as datasets
from rotalabs_steer.datasets import (
    BEHAVIORS,
    ContrastPair,
    ContrastPairDataset,
    EvaluationDataset,
    load_behavior_pairs,
    load_evaluation_prompts,
)

LOADERS = {
    "refusal": "load_refusal_pairs", "uncertainty": "load_uncertainty_pairs",
    "tool_restraint": "load_tool_restraint_pairs", "instruction_hierarchy": "load_hierarchy_pairs",
    "formality": "load_formality_pairs", "conciseness": "load_conciseness_pairs",
    "creativity": "load_creativity_pairs", "assertiveness": "load_assertiveness_pairs",
    "humor": "load_humor_pairs", "empathy": "load_empathy_pairs",
    "technical_depth": "load_technical_depth_pairs",
}


@pytest.mark.parametrize("behavior", BEHAVIORS)
def test_shipped_pairs(behavior):
    dataset = getattr(datasets, LOADERS[behavior])()
    assert isinstance(dataset, ContrastPairDataset) and dataset.behavior == behavior
    assert len(dataset) >= 60
    users = [p.metadata["user"] for p in dataset]
    assert len(set(users)) == len(users), "a user turn appears twice"
    for pair in dataset:
        assert pair.positive != pair.negative
        user = pair.metadata["user"]
        assert pair.positive.startswith(f"User: {user}\nAssistant: ")
        assert pair.negative.startswith(f"User: {user}\nAssistant: ")
    def mean_words(texts):
        return sum(len(t.split("Assistant: ", 1)[1].split()) for t in texts) / len(texts)
    pos, neg = mean_words(dataset.positives), mean_words(dataset.negatives)
    assert abs(pos - neg) / max(pos, neg) <= 0.25, f"length leaks into the vector: {pos:.1f} vs {neg:.1f} words"


@pytest.mark.parametrize("behavior", BEHAVIORS)
def test_held_out_prompts_share_no_user_turn(behavior):
    prompts = load_evaluation_prompts(behavior)
    assert isinstance(prompts, EvaluationDataset) and len(prompts) >= 20
    assert prompts.positive_examples and prompts.negative_examples
    users = {p.metadata["user"] for p in load_behavior_pairs(behavior)}
    assert not users & {e.prompt for e in prompts}


def test_reference_constants_and_aliases():
    assert datasets.get_refusal_pairs().positives == datasets.load_refusal_pairs().positives
    pairs = datasets.HUMOR_PAIRS
    assert isinstance(pairs, list) and set(pairs[0]) == {"positive", "negative"}
    with pytest.raises(AttributeError):
        datasets.NOT_A_CONSTANT


def test_dataset_members_and_round_trip(tmp_path):
    dataset = ContrastPairDataset("humor", description="d")
    dataset.add(ContrastPair("funny", "dry", {"k": 1}))
    dataset.add_pair("pun", "plain", topic="food")
    assert len(dataset) == 2 and dataset[1].metadata == {"topic": "food"}
    assert dataset.positives == ["funny", "pun"] and dataset.negatives == ["dry", "plain"]
    assert [p.positive for p in dataset] == dataset.positives
    dataset.save(tmp_path / "d.json")
    loaded = ContrastPairDataset.load(tmp_path / "d.json")
    assert (loaded.behavior, loaded.description, loaded.positives, loaded.negatives) == (
        "humor", "d", dataset.positives, dataset.negatives)
    assert loaded[0].metadata == {"k": 1}


def test_bad_records_are_named(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"behavior": "x", "pairs": [{"positive": "a", "negative": "b"}, {"positive": "a"}]}))
    with pytest.raises(ValueError, match=r"bad.json: pair 1: missing 'negative'"):
        ContrastPairDataset.load(path)
    with pytest.raises(ValueError, match="empty"):
        ContrastPair("text", "  ")
    with pytest.raises(TypeError, match="str"):
        ContrastPair("text", 3)
