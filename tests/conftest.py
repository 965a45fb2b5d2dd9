import os
import sys

# tests/ holds helper modules (tiny_models, ground_truth) imported by the test files.
sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture
def pairs():
    """Eight refusal pairs of different lengths, as the documented list-of-dicts input."""
    from rotalabs_steer.datasets import load_refusal_pairs

    dataset = load_refusal_pairs()
    return [{"positive": p.positive, "negative": p.negative} for p in list(dataset)[:8]]
