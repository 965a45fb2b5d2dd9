"""Progress bars that follow the ecosystem's switches.

A bar shows when the caller asked for it (``show_progress``) and neither tqdm's own
``TQDM_DISABLE`` environment variable nor transformers' ``disable_progress_bar()`` turned
bars off.
"""

from __future__ import annotations

import os
from typing import Any

from tqdm.auto import tqdm


def bars_enabled() -> bool:
    if os.environ.get("TQDM_DISABLE", "").strip().lower() not in ("", "0", "false", "no"):
        return False
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        return True
    return hf_logging.is_progress_bar_enabled()


def progress_bar(iterable: Any = None, *, show: bool, **options: Any) -> tqdm:
    """A tqdm bar (``options`` as tqdm takes them), disabled unless ``show`` and ``bars_enabled()``."""
    return tqdm(iterable, disable=not (show and bars_enabled()), **options)
