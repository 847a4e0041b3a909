"""Where compresspipe keeps what it can compute again (sensitivity curves, the names the model libraries know):
$COMPRESSPIPE_CACHE, default ~/.cache/compresspipe. Imports nothing."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "COMPRESSPIPE_CACHE"


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "compresspipe")
