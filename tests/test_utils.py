"""rotalabs_steer.utils: the vectors cache, and the hub paths without ever reaching the network
(tests/conftest.py sets HF_HUB_OFFLINE=1; other hub answers come from stand-ins)."""

from __future__ import annotations

import os
from pathlib import Path

import huggingface_hub
import pytest
import torch

from rotalabs_steer import SteeringVector, SteeringVectorSet
from rotalabs_steer.utils import (
    DEFAULT_VECTORS_REPO,
    clear_cache,
    download_vectors,
    get_cache_dir,
    list_available_vectors,
)


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.delenv("ROTALABS_STEER_CACHE", raising=False)
    return tmp_path


def test_cache_dir_follows_the_environment(home, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(home / "xdg"))
    assert get_cache_dir() == home / "xdg" / "rotalabs_steer"
    monkeypatch.setenv("ROTALABS_STEER_CACHE", str(home / "mine"))
    assert get_cache_dir() == home / "mine"


def saved_set(folder: Path, behavior="refusal") -> SteeringVectorSet:
    vectors = SteeringVectorSet(behavior, [SteeringVector(behavior, i, torch.randn(8), "qwen3-8b") for i in (3, 5)])
    vectors.save(folder)
    return vectors


def test_cache_dir_and_clear(home):
    assert get_cache_dir() == home / ".cache" / "rotalabs_steer"
    saved_set(get_cache_dir() / "vectors" / "qwen3-8b" / "refusal")
    (get_cache_dir() / "other.txt").write_text("kept")
    clear_cache()
    assert not (get_cache_dir() / "vectors").exists() and (get_cache_dir() / "other.txt").exists()
    clear_cache(vectors_only=False)
    assert not get_cache_dir().exists()
    clear_cache(vectors_only=False)  # nothing there: no error


def test_cached_vectors_need_no_hub(home, monkeypatch):
    def no_hub(**kwargs):
        raise AssertionError("the hub was asked although the vectors are cached")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_hub)
    want = saved_set(get_cache_dir() / "vectors" / "qwen3-8b" / "refusal")
    path = download_vectors("refusal", "qwen3-8b")
    assert path == get_cache_dir() / "vectors" / "qwen3-8b" / "refusal"
    loaded = SteeringVectorSet.load(path)
    assert loaded.layers == [3, 5] and torch.equal(loaded[5].vector, want[5].vector)


def test_offline_is_one_clear_error(tmp_path):
    assert os.environ.get("HF_HUB_OFFLINE") == "1"  # conftest: this test must never reach the network
    pattern = rf"{DEFAULT_VECTORS_REPO}: the Hugging Face Hub is unreachable"
    with pytest.raises(RuntimeError, match=pattern):
        download_vectors("refusal", "qwen3-8b", output_dir=tmp_path)
    with pytest.raises(RuntimeError, match="my/repo: the Hugging Face Hub is unreachable"):
        list_available_vectors("my/repo")
    saved_set(tmp_path / "qwen3-8b" / "refusal")
    assert download_vectors("refusal", "qwen3-8b", output_dir=tmp_path) == tmp_path / "qwen3-8b" / "refusal"
    # force asks the hub; offline, huggingface_hub itself falls back to the folder already there
    assert download_vectors("refusal", "qwen3-8b", output_dir=tmp_path, force=True) == tmp_path / "qwen3-8b" / "refusal"


def test_download_through_the_hub_client(tmp_path, monkeypatch):
    calls = []

    def fake_snapshot(**kwargs):
        calls.append(kwargs)
        pattern = kwargs["allow_patterns"][0]
        saved_set(Path(kwargs["local_dir"]) / pattern.removesuffix("/*"), behavior="humor")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    path = download_vectors("humor", "llama-3-8b", output_dir=tmp_path, repo_id="me/vecs", revision="v1")
    assert path == tmp_path / "llama-3-8b" / "humor" and SteeringVectorSet.load(path).behavior == "humor"
    assert calls == [{"repo_id": "me/vecs", "repo_type": "dataset", "revision": "v1", "local_dir": tmp_path,
                      "allow_patterns": ["llama-3-8b/humor/*"]}]


def test_download_errors(tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda **kwargs: None)
    with pytest.raises(FileNotFoundError, match=r"me/vecs .*has no m/b/metadata.json"):
        download_vectors("b", "m", output_dir=tmp_path, repo_id="me/vecs")

    class ConnectError(Exception):  # what an HTTP client raises when DNS or TCP fails
        pass

    class TransportError(Exception):
        pass

    class ClientConnectError(ConnectError, TransportError):
        pass

    def refused(**kwargs):
        raise ClientConnectError("[Errno -2] Name or service not known")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", refused)
    with pytest.raises(RuntimeError, match="me/vecs: the Hugging Face Hub is unreachable"):
        download_vectors("b", "m", output_dir=tmp_path, repo_id="me/vecs")

    def missing_repo(**kwargs):
        raise ValueError("Repository Not Found")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", missing_repo)
    with pytest.raises(RuntimeError, match="from me/vecs: ValueError: Repository Not Found") as info:
        download_vectors("b", "m", output_dir=tmp_path, repo_id="me/vecs")
    assert "unreachable" not in str(info.value)


def test_list_available_vectors(monkeypatch):
    files = ["README.md", "qwen3-8b/refusal/metadata.json", "qwen3-8b/refusal/layer_14.pt",
             "v2/llama-3-8b/humor/metadata.json", "metadata.json", "loose/metadata.json"]

    class FakeApi:
        def list_repo_files(self, repo_id, repo_type):
            assert (repo_id, repo_type) == (DEFAULT_VECTORS_REPO, "dataset")
            return files

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    assert list_available_vectors() == [
        {"model": "qwen3-8b", "behavior": "refusal", "path": "qwen3-8b/refusal"},
        {"model": "llama-3-8b", "behavior": "humor", "path": "llama-3-8b/humor"},
    ]


@pytest.mark.parametrize("behavior,model_name,name", [
    ("", "m", "behavior"), ("b", "  ", "model_name"), ("../etc", "m", "behavior"),
    ("b", "/abs", "model_name"), (3, "m", "behavior"),
])
def test_bad_names(tmp_path, behavior, model_name, name):
    with pytest.raises(ValueError, match=f"^{name} must be"):
        download_vectors(behavior, model_name, output_dir=tmp_path)
