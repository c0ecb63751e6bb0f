"""Fixtures for the data-pipeline tests; also makes the repo importable uninstalled."""

import pathlib
import sys

import pytest

_ROOT = pathlib.Path(__file__).resolve().parents[2]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from mamba3_jax.data.paths import default_data_dir  # noqa: E402


@pytest.fixture(scope="session")
def data_dir() -> pathlib.Path:
    """The shared data folder; tests that need it skip when it is absent."""
    try:
        return default_data_dir()
    except FileNotFoundError as e:
        pytest.skip(f"shared data not available: {e}")


@pytest.fixture(scope="session")
def sample_text(data_dir) -> str:
    """~40 kB of real English from the books valid split plus some non-ASCII text."""
    from mamba3_jax.data.sources import BooksSource

    book = BooksSource("valid", data_dir, max_bytes=40_000, cache_dir=False)[0]
    return book + "\nnaïve café — 東京 ½ emoji 🙂 tabs\tand  double  spaces\r\n"
