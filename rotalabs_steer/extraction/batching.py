"""Texts to padded token batches: tokenize once, bucket by length, pad on the right.

Padding is always on the right and done here, whatever the tokenizer's
``padding_side``: with causal attention, real tokens never see right padding, so
every row equals its unpadded forward and absolute positions (GPT-2, OPT) stay right.
The tokenizer itself is never modified.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

POSITIVE, NEGATIVE = 0, 1
TOKEN_POSITIONS = ("last", "first", "mean", "answer")


@dataclass
class TokenBatch:
    """One forward's worth of rows: right-padded ids, mask, and what to read from each row."""

    input_ids: torch.Tensor       # [batch, seq] int64
    attention_mask: torch.Tensor  # [batch, seq] int64, 1 for real tokens
    groups: torch.Tensor          # [batch] int64: POSITIVE, NEGATIVE, or -1 (skip)
    read_index: torch.Tensor | None  # [batch] int64, token read per row ("last"/"first"/explicit)
    lengths: torch.Tensor         # [batch] int64, real tokens per row
    row_ids: torch.Tensor         # [batch] int64, each row's index in the token_ids given to make_batches

    @property
    def num_rows(self) -> int:
        return int(self.input_ids.shape[0])


TOKENIZE_CHUNK = 256  # texts per tokenizer call


def tokenize(tokenizer, texts: Sequence[str], max_length: int,
             read_chars: Sequence[int] | None = None) -> tuple[list[list[int]], list[int] | None]:
    """Token ids per text, exactly as ``tokenizer(text, truncation=True, max_length=...)``.

    With ``read_chars`` (a character index per text, e.g. a CAA answer letter), also the
    index of the token that holds that character in each text.
    """
    texts = list(texts)
    ids: list[list[int]] = []
    read: list[int] | None = None if read_chars is None else []
    # In chunks: one call over thousands of texts holds every Encoding (offsets, masks, ...)
    # at once, and the allocator keeps that peak. Only the ids (and read indices) are kept.
    for start in range(0, len(texts), TOKENIZE_CHUNK):
        chunk = texts[start:start + TOKENIZE_CHUNK]
        encoded = tokenizer(chunk, truncation=True, max_length=max_length)
        ids.extend(list(row) for row in encoded["input_ids"])
        if read is not None:
            read.extend(_read_indices(encoded, chunk, read_chars[start:start + TOKENIZE_CHUNK], start))
        del encoded
    at_limit = [i for i, row in enumerate(ids) if len(row) >= max_length]
    if at_limit:
        full = tokenizer([texts[i] for i in at_limit], truncation=False)["input_ids"]
        truncated = sum(len(row) > max_length for row in full)
        if truncated:
            warnings.warn(
                f"{truncated} text(s) are longer than max_length={max_length} tokens and were "
                "truncated (as the reference implementation does)",
                stacklevel=3,
            )
    for i, row in enumerate(ids):
        if len(row) == 0:
            raise ValueError(f"contrast_pairs: text {i} ({texts[i]!r}) produced no tokens")
    return ids, read


def _read_indices(encoded, texts: Sequence[str], read_chars: Sequence[int], offset: int) -> list[int]:
    """Index of the token holding each text's ``read_chars`` character."""
    if not getattr(encoded, "is_fast", False):
        raise ValueError("token_position='answer' needs a fast tokenizer (character offsets)")
    read = []
    for i, char in enumerate(read_chars):
        token = encoded.char_to_token(i, char)
        if token is None:
            raise ValueError(f"contrast_pairs: text {offset + i}: character {char} "
                             f"({texts[i][char:char + 1]!r}) maps to no token (truncated by max_length?)")
        read.append(token)
    return read


def pad_token_id(tokenizer) -> int | None:
    """The id used for right padding: pad, else EOS (padded positions are masked anyway)."""
    for attr in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if isinstance(value, list):
            value = value[0] if value else None
        if isinstance(value, int):
            return value
    return None


def pad_right(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[rows, longest] int64 ids padded on the right with ``pad_id``, and the mask of real tokens."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for r, s in enumerate(sequences):
        ids[r, :len(s)] = torch.as_tensor(s, dtype=torch.long)
        mask[r, :len(s)] = 1
    return ids, mask


def make_batches(
    token_ids: Sequence[Sequence[int]],
    groups: Sequence[int],
    token_position: str,
    batch_size: int,
    pad_id: int | None,
    read_indices: Sequence[int] | None = None,
    order: Sequence[int] | None = None,
) -> Iterator[TokenBatch]:
    """Bucket rows by length (longest first, so memory peaks on the first batch) and pad.

    ``read_indices`` gives an explicit token per row; negative values count from the end
    of the row's real tokens. ``order`` replaces the bucketing order (see ``pair_order``).
    """
    if order is None:
        order = sorted(range(len(token_ids)), key=lambda i: -len(token_ids[i]))
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        lengths = [len(token_ids[i]) for i in rows]
        width = max(lengths)
        if pad_id is None and min(lengths) != width:
            raise ValueError(
                "tokenizer has neither pad_token_id nor eos_token_id, needed to pad batches; "
                "set tokenizer.pad_token (any token works: padding is masked) or use batch_size=1"
            )
        ids, mask = pad_right([token_ids[i] for i in rows], pad_id if pad_id is not None else 0)
        length_tensor = torch.as_tensor(lengths, dtype=torch.long)
        if read_indices is not None:
            read = torch.as_tensor([read_indices[i] for i in rows], dtype=torch.long)
            read = torch.where(read < 0, read + length_tensor, read)
        elif token_position == "last":
            read = length_tensor - 1
        elif token_position == "first":
            read = torch.zeros(len(rows), dtype=torch.long)
        else:
            read = None
        yield TokenBatch(ids, mask, torch.as_tensor([groups[i] for i in rows], dtype=torch.long),
                         read, length_tensor, torch.as_tensor(rows, dtype=torch.long))


def pair_order(token_ids: Sequence[Sequence[int]], partner: Sequence[int]) -> list[int]:
    """Row order that puts each row next to its pair partner (``partner[i]``), pairs bucketed
    by their longer member, longest first.

    Second moments of the differences need both members of a pair: adjacent, they share a
    batch or sit in two consecutive ones, so at most one row per layer waits for its partner.
    """
    firsts = [i for i in range(len(token_ids)) if i < partner[i]]
    firsts.sort(key=lambda i: -max(len(token_ids[i]), len(token_ids[partner[i]])))
    return [row for i in firsts for row in (i, partner[i])]
