"""Where the shared (read-only) data and the local cache live.

The repository is cloned next to a ``shared/`` folder (``<clone>/../shared/data``
in CI, ``/work/shared/data`` on the dev box), so the data directory is found by
walking up from the repository root. ``MAMBA3_DATA_DIR`` overrides the search.
"""

from __future__ import annotations

import os
from pathlib import Path

DATA_DIR_ENV = "MAMBA3_DATA_DIR"
CACHE_DIR_ENV = "MAMBA3_CACHE_DIR"

# mamba3_jax/data/paths.py -> parents[2] is the repository root.
_REPO_ROOT = Path(__file__).resolve().parents[2]


def repo_root() -> Path:
    """The root of this repository checkout (the folder holding ``mamba3_jax/``)."""
    return _REPO_ROOT


def default_data_dir() -> Path:
    """Returns the shared data directory.

    Order: ``$MAMBA3_DATA_DIR`` if set; else the first ``<dir>/shared/data`` found
    walking up from the repository root (the root itself, then its parents).

    Raises:
      FileNotFoundError: if ``$MAMBA3_DATA_DIR`` points to a missing folder, or no
        ``shared/data`` folder exists above the repository.
    """
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        path = Path(env).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(
                f"${DATA_DIR_ENV} is set to {str(path)!r}, which is not a directory."
            )
        return path
    searched = []
    for base in (_REPO_ROOT, *_REPO_ROOT.parents):
        candidate = base / "shared" / "data"
        searched.append(str(candidate))
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(
        "Could not find the shared data directory. Set $"
        f"{DATA_DIR_ENV} or place it at <repo>/../shared/data. Searched: " + ", ".join(searched)
    )


def default_cache_dir() -> Path:
    """Returns the local cache directory (not created here).

    ``$MAMBA3_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/mamba3_jax``, else
    ``~/.cache/mamba3_jax``.
    """
    env = os.environ.get(CACHE_DIR_ENV)
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "mamba3_jax"
