"""Run under torchrun by test_distributed.py: extract on every rank, save what each rank got."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_distributed import LAYERS, extraction_inputs  # noqa: E402
from rotalabs_steer.extraction import extract_caa_vectors  # noqa: E402


def main(out_dir: str, mode: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model, tokenizer, pairs = extraction_inputs()
    group = dist.new_group([0, 1]) if mode == "explicit" else None
    vectors = extract_caa_vectors(model, tokenizer, pairs, LAYERS, "mean", show_progress=False,
                                  batch_size=3, process_group=group)
    vectors.save(Path(out_dir) / f"rank{rank}")
    if mode == "auto":
        # False opts out: this rank alone, no collective (the other rank does not take part).
        if rank == 0:
            local = extract_caa_vectors(model, tokenizer, pairs[:2], LAYERS, "mean", show_progress=False,
                                        process_group=False)
            local.save(Path(out_dir) / "rank0-local")
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps({"world": dist.get_world_size()}))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
