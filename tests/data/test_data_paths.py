"""Locating the shared data and cache folders."""

import pytest

from mamba3_jax.data import paths


def test_env_var_overrides_data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv(paths.DATA_DIR_ENV, str(tmp_path))
    assert paths.default_data_dir() == tmp_path
    monkeypatch.setenv(paths.DATA_DIR_ENV, str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="MAMBA3_DATA_DIR.*missing"):
        paths.default_data_dir()


def test_data_dir_is_found_above_the_repo(monkeypatch, data_dir):
    monkeypatch.delenv(paths.DATA_DIR_ENV, raising=False)
    found = paths.default_data_dir()
    assert found.name == "data" and found.parent.name == "shared"
    assert (found / "books" / "manifest.tsv").is_file()
    root = paths.repo_root()
    assert found.parent.parent in (root, *root.parents)


def test_data_dir_search_error_lists_candidates(monkeypatch, tmp_path):
    monkeypatch.delenv(paths.DATA_DIR_ENV, raising=False)
    monkeypatch.setattr(paths, "_REPO_ROOT", tmp_path / "clone")
    if any((p / "shared" / "data").is_dir() for p in (tmp_path, *tmp_path.parents)):
        pytest.skip("a shared/data folder exists above the temp dir")
    with pytest.raises(FileNotFoundError, match="MAMBA3_DATA_DIR"):
        paths.default_data_dir()
    (tmp_path / "shared" / "data").mkdir(parents=True)
    assert paths.default_data_dir() == tmp_path / "shared" / "data"


def test_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv(paths.CACHE_DIR_ENV, str(tmp_path / "c"))
    assert paths.default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv(paths.CACHE_DIR_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert paths.default_cache_dir() == tmp_path / "mamba3_jax"
