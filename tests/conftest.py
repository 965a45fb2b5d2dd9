import os
import sys

# tests/ holds helper modules (tiny_models, ground_truth) imported by the test files.
sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` need CUDA: skipped cleanly where there is none."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def pairs():
    """Eight refusal pairs of different lengths, as the documented list-of-dicts input."""
    from tiny_models import refusal_pairs

    return refusal_pairs(8)
