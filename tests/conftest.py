import os

# Tests compare float32 paths at ~1e-5: single-threaded Eigen keeps CPU results deterministic.
os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false")
