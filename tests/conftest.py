import os

# Tests compare float32 paths at ~1e-5: single-threaded Eigen keeps CPU results deterministic.
os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false")
import pytest

# Test folders that choose their own precision: the Pallas kernel tests compare a kernel (whose
# in-kernel dot precision is the kernel's choice) against a reference with their own tolerances.
_OWN_PRECISION = ("kernels", "kernels_tpu")


@pytest.fixture(autouse=True)
def _exact_f32_matmuls(request):
    """On GPU/TPU, f32 matmuls default to TF32 / bf16 passes (~1e-3 relative), which is not what
    tests comparing two f32 computations at 1e-5 mean: run them at full f32 ("highest"). On CPU
    this is already the default, so nothing changes there (nor in the compiled programs)."""
    parts = request.node.path.relative_to(os.path.dirname(__file__)).parts
    if parts[0] in _OWN_PRECISION:
        yield
        return
    import jax

    if jax.default_backend() == "cpu":
        yield
        return
    with jax.default_matmul_precision("highest"):
        yield
