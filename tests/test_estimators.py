"""Every extraction method from one pass: collect_pair_statistics, PairStatistics, extract_vectors.

Ground truth: float64 rows from unbatched per-text forwards of a float64 copy of the model,
and the same methods written directly in numpy on those rows.
"""

from __future__ import annotations

import os
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
import torch
from ground_truth import pair_rows
from tiny_models import HIDDEN, MODEL_KINDS, hook_count, make_model, make_tokenizer, refusal_pairs

from rotalabs_steer.extraction import (
    CAA,
    METHODS,
    PCA,
    ExtractionMethod,
    Fisher,
    PairStatistics,
    PCADiff,
    collect_pair_statistics,
    extract_caa_vectors,
    extract_vectors,
)
from rotalabs_steer.extraction.methods import _lanczos_top, top_eigenpairs

LAYERS = [1, 3]
NUM_PAIRS = 6


@lru_cache(maxsize=None)
def model_of(kind):
    return make_model(kind)


@lru_cache(maxsize=None)
def _truth(kind):
    return pair_rows(model_of(kind), make_tokenizer(), refusal_pairs(NUM_PAIRS), LAYERS, ("last", "mean"))


def truth_rows(kind, token_position):
    return _truth(kind)[token_position]


def numpy_methods(pos: np.ndarray, neg: np.ndarray, shrinkage: float = 0.1) -> dict[str, tuple[np.ndarray, float]]:
    """Each method written out on the rows: {method: (vector, eigengap or inf)}."""
    d = pos - neg
    mean = d.mean(0)
    out = {"caa": (pos.mean(0) - neg.mean(0), np.inf)}
    for name, matrix in (("pca", d.T @ d / len(d)), ("pca_diff", np.cov(d.T, bias=True))):
        values, vectors = np.linalg.eigh(matrix)
        u = vectors[:, -1] * np.sign(vectors[:, -1] @ mean)
        out[name] = (u, (values[-1] - values[-2]) / values[-1])
    covariance = np.cov(d.T, bias=True)
    eps = shrinkage * np.trace(covariance) / len(mean)
    fisher = np.linalg.solve(covariance + eps * np.eye(len(mean)), mean)
    out["fisher"] = (fisher / np.linalg.norm(fisher), np.inf)
    return out


def rel(got, want) -> float:
    got = got.double().numpy() if isinstance(got, torch.Tensor) else got
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


# ------------------------------------------------------------------------- accuracy


@pytest.mark.parametrize("kind", MODEL_KINDS)
@pytest.mark.parametrize("token_position", ["last", "mean"])
@pytest.mark.parametrize("batch_size,padding_side", [(1, "right"), (3, "left")])
def test_every_method_matches_float64_truth(kind, token_position, batch_size, padding_side):
    tokenizer = make_tokenizer(padding_side=padding_side)
    stats = collect_pair_statistics(model_of(kind), tokenizer, refusal_pairs(NUM_PAIRS), LAYERS, token_position,
                                    show_progress=False, batch_size=batch_size)
    assert stats.layers == LAYERS and stats.num_pairs == NUM_PAIRS and list(stats.pair_counts) == [NUM_PAIRS] * 2
    assert tokenizer.padding_side == padding_side and hook_count(model_of(kind)) == 0
    for layer in LAYERS:
        pos, neg = (rows.numpy() for rows in truth_rows(kind, token_position)[layer])
        want = numpy_methods(pos, neg)
        for method in METHODS:
            vector = stats.vectors(method)[layer]
            expected, gap = want[method]
            assert vector.extraction_method == method
            if method == "caa":
                assert rel(vector.vector, expected) <= 1e-5
            elif gap > 0.05:  # a direction is only determined when the top eigenvalue stands out
                assert rel(vector.vector, expected) <= 1e-3, (method, layer, gap)
                assert abs(vector.norm - 1) < 1e-6


def test_caa_of_the_statistics_is_todays_caa():
    model, tokenizer = model_of("llama"), make_tokenizer()
    stats = collect_pair_statistics(model, tokenizer, refusal_pairs(NUM_PAIRS), LAYERS, show_progress=False,
                                    batch_size=4)
    today = extract_caa_vectors(model, tokenizer, refusal_pairs(NUM_PAIRS), LAYERS, show_progress=False,
                                batch_size=4)
    # Pairs share batches here, texts are bucketed by length there: float32 round-off only.
    for got, want in zip(stats.vectors("caa"), today):
        assert rel(got.vector, want.vector.double().numpy()) <= 1e-5
        assert got.metadata.keys() == want.metadata.keys()
        assert got.metadata["num_positive"] == want.metadata["num_positive"] == NUM_PAIRS
    via_api = extract_vectors(model, tokenizer, refusal_pairs(NUM_PAIRS), LAYERS, "caa", show_progress=False,
                              batch_size=4)
    assert all(torch.equal(a.vector, b.vector) for a, b in zip(via_api, today))  # the same CAA pass


def test_metadata_of_directions():
    stats = collect_pair_statistics(model_of("qwen3"), make_tokenizer(), refusal_pairs(NUM_PAIRS), LAYERS,
                                    show_progress=False, batch_size=2)
    pos, neg = (rows.numpy() for rows in truth_rows("qwen3", "last")[3])
    d = pos - neg
    caa = stats.vectors("caa")[3]
    for method in ("pca", "pca_diff", "fisher"):
        vector = stats.vectors(method)[3]
        meta = vector.metadata
        u = vector.vector.double().numpy()
        assert meta["method"] == method and meta["num_pairs"] == NUM_PAIRS and meta["token_position"] == "last"
        assert meta["caa_projection"] > 0
        assert meta["caa_projection"] == pytest.approx(float(u @ d.mean(0)), rel=1e-4)
        assert meta["cosine_with_caa"] == pytest.approx(float(u @ caa.vector.double().numpy()) / caa.norm, rel=1e-5)
        assert "separation_accuracy" in meta and "separation_cohens_d" in meta
        assert vector.held_out_projections is not None
        # scale() brings a direction to CAA's length along it
        assert vector.scale(meta["caa_projection"]).norm == pytest.approx(meta["caa_projection"], rel=1e-6)
    pca = stats.vectors("pca")[3].metadata
    values = np.linalg.eigvalsh(d.T @ d)
    assert pca["explained_variance_ratio"] == pytest.approx(values[-1] / values.sum(), rel=1e-4)
    values = np.linalg.eigvalsh(np.cov(d.T, bias=True))
    assert stats.vectors("pca_diff")[3].metadata["explained_variance_ratio"] == pytest.approx(
        values[-1] / values.sum(), rel=1e-4)
    assert stats.vectors("fisher", shrinkage=0.5)[3].metadata["shrinkage"] == 0.5


def test_extraction_method_classes():
    model, tokenizer = model_of("llama"), make_tokenizer()
    stats = collect_pair_statistics(model, tokenizer, refusal_pairs(4), [2], show_progress=False, batch_size=2)
    for cls, method, options in ((CAA, "caa", {}), (PCA, "pca", {}), (PCADiff, "pca_diff", {}),
                                 (Fisher, "fisher", {"shrinkage": 0.3})):
        extractor = cls(batch_size=2, **options)
        assert isinstance(extractor, ExtractionMethod) and extractor.name == method
        got = extractor.extract(model, tokenizer, refusal_pairs(4), [2])
        want = stats.vectors(method, **options)
        assert got[2].extraction_method == method
        assert rel(got[2].vector, want[2].vector.double().numpy()) <= 1e-5


# --------------------------------------------------------------- steering-vectors


def _steering_vectors_python() -> Path | None:
    override = os.environ.get("ROTALABS_STEERING_VECTORS_PYTHON")
    path = Path(override) if override else Path(__file__).parent.parent / "bench/.venvs/steering-vectors/bin/python"
    return path if path.exists() else None


def test_pca_equals_steering_vectors_pca_aggregator(tmp_path):
    python = _steering_vectors_python()
    if python is None:
        pytest.skip("steering-vectors venv absent (bench/.venvs/steering-vectors or ROTALABS_STEERING_VECTORS_PYTHON)")
    pos, neg = truth_rows("gpt2", "last")[3]
    np.save(tmp_path / "pos.npy", pos.numpy())
    np.save(tmp_path / "neg.npy", neg.numpy())
    script = ("import numpy as np, torch, sys\n"
              "from steering_vectors.aggregators import pca_aggregator\n"
              "pos, neg = (torch.from_numpy(np.load(sys.argv[1] + f)) for f in ('/pos.npy', '/neg.npy'))\n"
              "np.save(sys.argv[1] + '/out.npy', pca_aggregator()(pos, neg).numpy())\n")
    subprocess.run([str(python), "-c", script, str(tmp_path)], check=True, cwd=tmp_path, timeout=120)
    theirs = np.load(tmp_path / "out.npy")
    stats = collect_pair_statistics(model_of("gpt2"), make_tokenizer(), refusal_pairs(NUM_PAIRS), [3],
                                    show_progress=False, batch_size=4)
    assert rel(stats.vectors("pca")[3].vector, theirs) <= 1e-3


# ---------------------------------------------------------------- merge, files, memory


def test_two_halves_add_up_to_the_whole(tmp_path):
    model, tokenizer, pairs = model_of("llama"), make_tokenizer(), refusal_pairs(10)
    # batch_size=2: each forward is one pair, the same in the whole and in the halves, so
    # the rows are bit-equal and only float64 summation order differs.
    kwargs = dict(show_progress=False, batch_size=2)
    whole = collect_pair_statistics(model, tokenizer, pairs, LAYERS, **kwargs)
    first = collect_pair_statistics(model, tokenizer, pairs[:6], LAYERS, **kwargs)
    second = collect_pair_statistics(model, tokenizer, pairs[6:], LAYERS, **kwargs)
    merged = first + second
    assert merged.num_pairs == 10 and list(merged.pair_counts) == [10, 10]
    np.testing.assert_allclose(merged.moments, whole.moments, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(merged.difference_sums, whole.difference_sums, rtol=1e-9, atol=1e-12)
    assert merged.fold_counts.sum() == whole.fold_counts.sum()
    for method in METHODS:
        for a, b in zip(merged.vectors(method), whole.vectors(method)):
            assert rel(a.vector, b.vector.double().numpy()) <= 1e-6
        assert a.metadata["num_pairs"] == 10
    with pytest.raises(ValueError, match="different layers"):
        first + collect_pair_statistics(model, tokenizer, pairs[:2], [2], **kwargs)


def test_save_load_round_trip_is_bit_exact(tmp_path):
    stats = collect_pair_statistics(model_of("gpt2"), make_tokenizer(), refusal_pairs(NUM_PAIRS), LAYERS, "mean",
                                    show_progress=False, batch_size=5)
    stats.save(tmp_path / "stats.safetensors")
    loaded = PairStatistics.load(tmp_path / "stats.safetensors")
    assert (loaded.layers, loaded.num_pairs, loaded.token_position, loaded.info) == (
        stats.layers, stats.num_pairs, stats.token_position, stats.info)
    for name in ("fold_sums", "fold_counts", "pair_counts", "difference_sums", "moments"):
        assert np.array_equal(getattr(loaded, name), getattr(stats, name)) and getattr(loaded, name).dtype == \
            getattr(stats, name).dtype
    for (rows_a, groups_a), (rows_b, groups_b) in zip(loaded.samples, stats.samples):
        assert np.array_equal(rows_a, rows_b) and np.array_equal(groups_a, groups_b)
    for method in METHODS:
        for a, b in zip(loaded.vectors(method), stats.vectors(method)):
            assert torch.equal(a.vector, b.vector)
            assert {k: v for k, v in a.metadata.items() if k != "created_at"} == \
                {k: v for k, v in b.metadata.items() if k != "created_at"}
    (tmp_path / "other.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    with pytest.raises(Exception):
        PairStatistics.load(tmp_path / "other.safetensors")


def test_state_size_does_not_grow_with_pairs():
    model, tokenizer = model_of("llama"), make_tokenizer()
    sizes = []
    for n in (6, 24):  # both at least DEFAULT_FOLDS pairs
        stats = collect_pair_statistics(model, tokenizer, refusal_pairs(n), LAYERS, show_progress=False,
                                        batch_size=3, separation_sample=0)
        sizes.append(sum(getattr(stats, name).nbytes for name in
                         ("fold_sums", "fold_counts", "pair_counts", "difference_sums", "moments")))
        assert stats.moments.shape == (len(LAYERS), HIDDEN, HIDDEN)
    assert sizes[0] == sizes[1]


# ------------------------------------------------------------------ degenerate cases


def test_one_pair_and_equal_differences():
    model, tokenizer = model_of("llama"), make_tokenizer()
    pair = refusal_pairs(1)
    for pairs in (pair, pair * 3):  # one pair; three identical pairs (all differences equal)
        stats = collect_pair_statistics(model, tokenizer, pairs, [2], show_progress=False, batch_size=2)
        caa = stats.vectors("caa")[2].vector.double()
        unit = caa / caa.norm()
        assert rel(stats.vectors("pca")[2].vector, unit.numpy()) <= 1e-5
        with pytest.raises(ValueError, match="do not vary"):
            stats.vectors("pca_diff")
        fisher = stats.vectors("fisher")[2]  # the limit of the formula: the mean difference's direction
        assert fisher.metadata["fisher_degenerate"] is True
        assert rel(fisher.vector, unit.numpy()) <= 1e-5


def test_fewer_pairs_than_hidden_needs_shrinkage():
    stats = collect_pair_statistics(model_of("llama"), make_tokenizer(), refusal_pairs(4), [2],
                                    show_progress=False, batch_size=2)
    assert torch.isfinite(stats.vectors("fisher")[2].vector).all()  # H = 64 > N = 4: shrinkage makes it solvable
    with pytest.raises(ValueError, match="singular.*shrinkage > 0"):
        stats.vectors("fisher", shrinkage=0.0)


def test_bad_arguments_are_clear_errors():
    model, tokenizer = model_of("llama"), make_tokenizer()
    with pytest.raises(ValueError, match="method"):
        extract_vectors(model, tokenizer, refusal_pairs(2), [1], "lda", show_progress=False)
    caa_only = extract_caa_vectors  # noqa: F841 (the fast path keeps no moments)
    from rotalabs_steer.extraction.caa import collect
    plain = collect(model, tokenizer, refusal_pairs(2), [1], "last", False, 1, 512, None, 0, "residual", None)
    with pytest.raises(ValueError, match="needs second moments"):
        plain.vectors("pca")
    stats = collect_pair_statistics(model, tokenizer, refusal_pairs(3), [1], show_progress=False)
    with pytest.raises(TypeError, match="shrinkage"):
        stats.vectors("pca", shrinkage=0.2)
    with pytest.raises(ValueError, match="shrinkage"):
        stats.vectors("fisher", shrinkage=-1)
    with pytest.raises(ValueError, match="method must be one of"):
        stats.vectors("mean")
    assert hook_count(model) == 0


# ------------------------------------------------------------------ eigensolver


def test_lanczos_top_eigenvector_matches_eigh():
    rng = np.random.default_rng(3)
    hidden = 700
    basis = rng.standard_normal((hidden, 40))
    matrix = basis @ np.diag(np.linspace(1, 5, 40)) @ basis.T + np.outer(basis[:, 0], basis[:, 0]) * 50
    value, second, vector = _lanczos_top(matrix, rng)
    values, vectors = np.linalg.eigh(matrix)
    assert value == pytest.approx(values[-1], rel=1e-9) and second == pytest.approx(values[-2], rel=1e-6)
    assert abs(abs(vector @ vectors[:, -1]) - 1) < 1e-9
    assert top_eigenpairs(matrix)[0] == pytest.approx(values[-1], rel=1e-9)  # large H takes Lanczos


# ------------------------------------------------------------------ distributed, CLI


@pytest.mark.slow  # a torchrun launch
def test_two_ranks_all_reduce_the_moments(tmp_path):
    from test_distributed import extraction_inputs, run_torchrun

    run_torchrun(tmp_path, "moments", worker=Path(__file__).with_name("distributed_moments.py"))
    ranks = [PairStatistics.load(tmp_path / f"rank{r}.safetensors") for r in (0, 1)]
    model, tokenizer, pairs = extraction_inputs()
    single = collect_pair_statistics(model, tokenizer, pairs, LAYERS, "mean", show_progress=False, batch_size=2)
    assert np.array_equal(ranks[0].moments, ranks[1].moments)
    assert list(ranks[0].pair_counts) == [len(pairs)] * len(LAYERS) and ranks[0].info["world_size"] == 2
    np.testing.assert_allclose(ranks[0].moments, single.moments, rtol=1e-9, atol=1e-12)
    for method in METHODS:
        for got, want in zip(ranks[0].vectors(method), single.vectors(method)):
            assert rel(got.vector, want.vector.double().numpy()) <= 1e-6


def test_cli_extract_method(tmp_path, capsys):
    from rotalabs_steer.cli import main
    from rotalabs_steer.vectors import SteeringVectorSet

    model_dir = tmp_path / "model"
    model_of("llama").save_pretrained(model_dir)
    make_tokenizer().save_pretrained(model_dir)
    pairs = tmp_path / "pairs.json"
    pairs.write_text(__import__("json").dumps(refusal_pairs(6)))
    status = main(["extract", "--model", str(model_dir), "--pairs", str(pairs), "--layers", "1,3",
                   "--method", "pca_diff", "--batch-size", "4", "--out", str(tmp_path / "out")])
    assert status in (0, None)
    loaded = SteeringVectorSet.load(tmp_path / "out")
    assert loaded.layers == [1, 3] and all(v.extraction_method == "pca_diff" for v in loaded)
    assert all(abs(v.norm - 1) < 1e-6 for v in loaded)
    assert main(["extract", "--model", str(model_dir), "--pairs", str(pairs), "--method", "lda",
                 "--out", str(tmp_path / "x")]) == 2
    assert "--method" in capsys.readouterr().err
