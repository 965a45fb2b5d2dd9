"""Pre-extracted vectors on the Hugging Face Hub and their local cache (the reference's
``rotalabs_steer.utils`` import path).

Downloads go through ``huggingface_hub`` (installed with transformers). A hub that cannot be
reached (no network, or ``HF_HUB_OFFLINE=1``) gives one ``RuntimeError`` that names the
repository and says so; vectors already in the cache load without the hub.
"""

from __future__ import annotations

import shutil
from pathlib import Path, PurePosixPath

from .bundled_model import _cache_root

DEFAULT_VECTORS_REPO = "rotalabs/steering-vectors"
_REPO_TYPE = "dataset"


def get_cache_dir() -> Path:
    """The package's cache folder: ``~/.cache/rotalabs_steer`` as in the reference, unless
    ``ROTALABS_STEER_CACHE`` or ``XDG_CACHE_HOME`` says otherwise (the bundled model's cache
    lives there too). Downloaded vectors go under its ``vectors/`` folder."""
    return _cache_root()


def clear_cache(vectors_only: bool = True) -> None:
    """Delete the downloaded vectors (or, with ``vectors_only=False``, the whole cache folder)."""
    target = get_cache_dir() / "vectors" if vectors_only else get_cache_dir()
    if target.exists():
        shutil.rmtree(target)


def download_vectors(behavior: str, model_name: str, output_dir: Path | None = None,
                     repo_id: str = DEFAULT_VECTORS_REPO, revision: str = "main",
                     force: bool = False) -> Path:
    """The folder of ``model_name/behavior`` vectors from ``repo_id``, downloaded once.

    The folder is ``output_dir/model_name/behavior`` (``output_dir`` defaults to
    ``get_cache_dir() / "vectors"``); load it with ``SteeringVectorSet.load``. When its
    ``metadata.json`` is there already, nothing is downloaded unless ``force``.
    """
    subfolder = f"{_path_part(model_name, 'model_name')}/{_path_part(behavior, 'behavior')}"
    root = Path(output_dir) if output_dir is not None else get_cache_dir() / "vectors"
    local_path = root / model_name / behavior
    if (local_path / "metadata.json").exists() and not force:
        return local_path
    snapshot_download = _hub().snapshot_download
    try:
        snapshot_download(repo_id=repo_id, repo_type=_REPO_TYPE, revision=revision, local_dir=root,
                          allow_patterns=[f"{subfolder}/*"])
    except Exception as e:  # noqa: BLE001 - the hub client raises many types; each is reported
        raise _hub_error(e, repo_id, f"download the {subfolder} vectors") from e
    if not (local_path / "metadata.json").exists():
        raise FileNotFoundError(f"{repo_id} (revision {revision!r}) has no {subfolder}/metadata.json; "
                                "see list_available_vectors() for what it holds")
    return local_path


def list_available_vectors(repo_id: str = DEFAULT_VECTORS_REPO) -> list[dict]:
    """``[{"model", "behavior", "path"}]`` for every vector set (a ``metadata.json``) in ``repo_id``."""
    api = _hub().HfApi()
    try:
        files = api.list_repo_files(repo_id=repo_id, repo_type=_REPO_TYPE)
    except Exception as e:  # noqa: BLE001
        raise _hub_error(e, repo_id, "list the vectors") from e
    found = []
    for name in files:
        parts = PurePosixPath(name).parts
        if parts[-1] == "metadata.json" and len(parts) >= 3:
            model, behavior = parts[-3], parts[-2]
            found.append({"model": model, "behavior": behavior, "path": f"{model}/{behavior}"})
    return found


def _hub():
    try:
        import huggingface_hub
    except ImportError:
        raise ImportError("downloading vectors needs huggingface_hub: pip install huggingface_hub") from None
    return huggingface_hub


def _path_part(value: object, name: str) -> str:
    """A non-empty relative name that stays inside the cache folder."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{name} must be a non-empty string, got {value!r}")
    parts = PurePosixPath(value).parts
    if value.startswith("/") or ".." in parts or "\\" in value:
        raise ValueError(f"{name} must be a relative name like 'qwen3-8b', got {value!r}")
    return value


def _unreachable(error: BaseException | None) -> bool:
    """Offline mode, nothing cached while offline, or a connection that failed (any HTTP client)."""
    while error is not None:
        names = {cls.__name__ for cls in type(error).__mro__}
        if names & {"OfflineModeIsEnabled", "LocalEntryNotFoundError", "ConnectionError", "TimeoutError",
                    "TransportError", "ConnectTimeout"}:
            return True
        error = error.__cause__ or error.__context__
    return False


def _hub_error(error: Exception, repo_id: str, what: str) -> RuntimeError:
    if _unreachable(error):
        return RuntimeError(f"cannot {what} from {repo_id}: the Hugging Face Hub is unreachable "
                            "(no network, or HF_HUB_OFFLINE=1). Vectors downloaded before load from the "
                            "cache without it: SteeringVectorSet.load(<folder>).")
    return RuntimeError(f"cannot {what} from {repo_id}: {type(error).__name__}: {error}")
