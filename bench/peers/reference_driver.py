"""Benchmark driver for the reference package, rotalabs-steer 1.2.0 (run in bench/.venvs/reference).

Driven as its documentation shows a user would: pairs in its ContrastPairDataset, then
``rotalabs_steer.extraction.extract_caa_vectors(model, tokenizer, dataset, layers,
token_position, show_progress=False)``. That function takes no batch_size: it loops over
layers, and for each layer runs one full forward (LM head included) per text.
"""

from __future__ import annotations

import sys
from pathlib import Path

import _common


def main() -> None:
    job = _common.read_job()
    import rotalabs_steer
    from rotalabs_steer.datasets import ContrastPairDataset
    from rotalabs_steer.extraction import extract_caa_vectors

    version = _common.package_version("rotalabs-steer")
    where = Path(rotalabs_steer.__file__).resolve()
    # The import name is ours too: make sure this is the PyPI package in this venv.
    if version != "1.2.0" or Path(sys.prefix).resolve() not in where.parents:
        raise SystemExit(f"reference_driver: expected rotalabs-steer 1.2.0 inside {sys.prefix}, "
                         f"imported {version} from {where}")
    layers = list(job["layers"])

    def extract(model, tokenizer, pairs):
        dataset = ContrastPairDataset(job["behavior"])
        for positive, negative in pairs:
            dataset.add_pair(positive, negative)
        result = extract_caa_vectors(model, tokenizer, dataset, layers, job["token_position"],
                                     show_progress=False)
        return {layer: result.get(layer).vector for layer in layers}

    _common.run(job, extract, {"rotalabs-steer": version})


if __name__ == "__main__":
    main()
