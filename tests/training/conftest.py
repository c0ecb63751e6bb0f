import pytest


@pytest.fixture(scope="session")
def jax_cache(tmp_path_factory):
    """A persistent XLA compilation cache shared by the training tests (and their subprocesses;
    with pytest-xdist, by all workers): the same tiny programs are compiled once."""
    path = tmp_path_factory.getbasetemp().parent / "jax_cache_training"
    path.mkdir(exist_ok=True)
    return str(path)
