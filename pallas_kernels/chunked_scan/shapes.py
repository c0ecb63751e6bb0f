"""Named shapes shared by the tests and the benchmark of the chunked scan."""

# (B, L, H) at P 64, N 128, one B/C group: the official kernels' benchmark shapes
PREFILL_SHAPES = {"a": (8, 2048, 32), "b": (8, 2048, 64), "c": (1, 16384, 64)}

# small problems for the kernel tests (interpret mode is slow): N 64 with S 16 gives 32 rotated
# and 32 plain channels, each a power of two >= 16 as the GPU kernels need for their tiles
TEST_SHAPE = dict(B=2, H=2, N=64, P=16, S=16)
