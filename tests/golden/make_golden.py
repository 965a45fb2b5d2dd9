"""Write the golden vector files in this folder (run once; the files are committed).

    PYTHONPATH=. python tests/golden/make_golden.py

- ``ours.{json,safetensors,pt}``: ``SteeringVector.save`` of a fixed 8-dim float32 vector.
- ``reference_layout.{json,pt}``: the layout rotalabs-steer 1.2.0 writes (a sidecar with its
  six keys and no ``format`` marker; ``torch.save`` of the plain tensor), float16.
- ``reference_2d.{json,pt}``: the same layout holding a ``[1, 8]`` tensor.

tests/test_vector_files.py loads them and checks that re-saving gives the same bytes where
the format is deterministic (the JSON and safetensors files; ``torch.save`` zips carry a
random serialization id, so .pt files are compared by their tensor).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from rotalabs_steer import SteeringVector

HERE = Path(__file__).resolve().parent
VALUES = [0.5, -1.25, 2.0, 0.0, 3.5, -0.75, 1.0, -2.5]


def reference_sidecar(shape: list[int]) -> dict:
    return {
        "behavior": "refusal",
        "layer_index": 3,
        "model_name": "golden-model",
        "extraction_method": "caa",
        "metadata": {"created_at": "2025-01-02T03:04:05", "num_pairs": 4, "token_position": "last"},
        "vector_shape": shape,
    }


def main() -> None:
    ours = SteeringVector("refusal", 3, torch.tensor(VALUES, dtype=torch.float32), "golden-model",
                          metadata={"created_at": "2025-01-02T03:04:05", "num_pairs": 4, "vector_norm": 5.5})
    ours.save(HERE / "ours")
    for name, tensor in (("reference_layout", torch.tensor(VALUES, dtype=torch.float16)),
                         ("reference_2d", torch.tensor([VALUES], dtype=torch.float32))):
        (HERE / f"{name}.json").write_text(json.dumps(reference_sidecar(list(tensor.shape)), indent=2))
        torch.save(tensor, HERE / f"{name}.pt")


if __name__ == "__main__":
    main()
