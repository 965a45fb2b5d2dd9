"""Run under torchrun by test_estimators.py: pair statistics on every rank, saved per rank."""

from __future__ import annotations

import sys
from pathlib import Path

import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_distributed import LAYERS, extraction_inputs  # noqa: E402
from rotalabs_steer.extraction import collect_pair_statistics  # noqa: E402


def main(out_dir: str, mode: str) -> None:  # mode: run_torchrun's, unused
    dist.init_process_group("gloo")
    model, tokenizer, pairs = extraction_inputs()
    stats = collect_pair_statistics(model, tokenizer, pairs, LAYERS, "mean", show_progress=False, batch_size=2)
    stats.save(Path(out_dir) / f"rank{dist.get_rank()}.safetensors")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
