"""Batched generation with left padding, shared by the reference-style metrics and the scores.

Rows are grouped by length (less padding), left-padded so every row's next token comes
from its own last position, and generated together; the steering hooks of
``ActivationInjector`` skip the padding, so each row sees what a one-prompt ``generate``
would. Each continuation is cut after its first stop token, as a lone ``generate`` stops there.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from ..model_control import input_device
from ..progress import progress_bar


def stop_token_ids(model, tokenizer=None) -> list[int]:
    """The ids ``model.generate`` stops at: its generation config's ``eos_token_id``, else (with
    ``tokenizer``) the tokenizer's."""
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if ids is None and tokenizer is not None:
        ids = tokenizer.eos_token_id
    return [ids] if isinstance(ids, int) else list(ids or [])


def generate_left_padded(model, contexts: Sequence[Sequence[int]], batch_size: int, pad_id: int,
                         stop_ids: Sequence[int], *, show_progress: bool = False, desc: str = "generating",
                         **generate_kwargs: Any) -> list[list[int]]:
    """The new token ids of each context, in order, up to and including its first stop token.

    ``generate_kwargs`` go to ``model.generate`` as they are (e.g. ``max_new_tokens``,
    ``do_sample``, ``generation_config``). The caller chooses eval/inference mode and steering.
    """
    device = input_device(model)
    order = sorted(range(len(contexts)), key=lambda i: len(contexts[i]))
    out: list[list[int]] = [[] for _ in contexts]
    starts = range(0, len(order), batch_size)
    for start in progress_bar(starts, show=show_progress, desc=desc, unit="batch"):
        rows = order[start:start + batch_size]
        width = max(len(contexts[i]) for i in rows)
        ids = torch.tensor([[pad_id] * (width - len(contexts[i])) + list(contexts[i]) for i in rows])
        mask = torch.tensor([[0] * (width - len(contexts[i])) + [1] * len(contexts[i]) for i in rows])
        sequences = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **generate_kwargs)
        for i, new in zip(rows, sequences[:, width:].tolist()):
            end = next((k + 1 for k, token in enumerate(new) if token in stop_ids), len(new))
            out[i] = new[:end]
    return out
