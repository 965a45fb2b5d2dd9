"""How well a layer's vector separates positive from negative rows, on held-out pairs.

Pairs are split into K folds and the accumulator keeps sums per (side, fold), so the
vector without fold k is (total - fold k) / (n - n_k): exact, and free. A bounded
reservoir sample of selected rows (kept by the C accumulator) is projected onto the
vector of the folds it did not contribute to, centred on their midpoint:

  accuracy   fraction of sampled rows on the right side of the midpoint
  cohens_d   (mean positive score - mean negative score) / pooled standard deviation
"""

from __future__ import annotations

import numpy as np

DEFAULT_FOLDS = 5


def fold_of_pairs(num_pairs: int, folds: int) -> list[int]:
    """Fold of each pair: round robin, so every fold holds pairs from the whole list."""
    return [i % folds for i in range(num_pairs)]


def held_out_separation(fold_sums: np.ndarray, fold_counts: np.ndarray, rows: np.ndarray,
                        row_groups: np.ndarray) -> dict[str, float | int]:
    """Separation figures from per-(fold, side) sums ``[2K, hidden]`` and sampled rows.

    Group code ``g`` means side ``g % 2`` (0 positive, 1 negative) of fold ``g // 2``.
    """
    return projection_figures(*held_out_projections(fold_sums, fold_counts, rows, row_groups))


def projection_figures(positive: np.ndarray, negative: np.ndarray) -> dict[str, float | int]:
    """Accuracy of the sign of held-out scores, and Cohen's d between the two sides."""
    total = len(positive) + len(negative)
    if total == 0:
        return {"accuracy": float("nan"), "cohens_d": float("nan"), "sample_size": 0}
    accuracy = float((np.sum(positive > 0) + np.sum(negative <= 0)) / total)
    return {"accuracy": accuracy, "cohens_d": cohens_d(positive, negative), "sample_size": total}


def held_out_projections(fold_sums: np.ndarray, fold_counts: np.ndarray, rows: np.ndarray,
                         row_groups: np.ndarray, direction: np.ndarray | None = None
                         ) -> tuple[np.ndarray, np.ndarray]:
    """Scores of sampled positive and negative rows: each row projected onto the unit vector
    of the other folds, centred on their midpoint (positive scores lean positive).

    ``direction`` (a unit vector) replaces the per-fold mean-difference directions, for
    methods whose direction has no per-fold statistics; the midpoints stay held out."""
    folds = fold_sums.shape[0] // 2
    if len(rows) == 0 or folds < 2:
        return np.zeros(0), np.zeros(0)
    pos_sums, neg_sums = fold_sums[0::2], fold_sums[1::2]
    pos_counts, neg_counts = fold_counts[0::2].astype(np.float64), fold_counts[1::2].astype(np.float64)
    pos_rest = (pos_sums.sum(0) - pos_sums) / np.maximum(pos_counts.sum() - pos_counts, 1)[:, None]
    neg_rest = (neg_sums.sum(0) - neg_sums) / np.maximum(neg_counts.sum() - neg_counts, 1)[:, None]
    if direction is None:
        directions = pos_rest - neg_rest
        norms = np.linalg.norm(directions, axis=1, keepdims=True)
        units = np.divide(directions, norms, out=np.zeros_like(directions), where=norms > 0)
    else:
        units = np.broadcast_to(direction, pos_rest.shape)
    midpoints = (pos_rest + neg_rest) / 2
    fold, side = row_groups // 2, row_groups % 2
    scores = np.einsum("nh,nh->n", rows - midpoints[fold], units[fold])
    return scores[side == 0], scores[side == 1]


def cohens_d(a: np.ndarray, b: np.ndarray) -> float:
    if len(a) < 2 or len(b) < 2:
        return float("nan")
    pooled = ((len(a) - 1) * a.var(ddof=1) + (len(b) - 1) * b.var(ddof=1)) / (len(a) + len(b) - 2)
    return float((a.mean() - b.mean()) / np.sqrt(pooled)) if pooled > 0 else float("inf")
