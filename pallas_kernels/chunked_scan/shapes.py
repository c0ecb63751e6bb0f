"""Named shapes shared by the tests and the benchmark of the chunked scan."""

# (B, L, H) at P 64, N 128, one B/C group: the official kernels' benchmark shapes
PREFILL_SHAPES = {"a": (8, 2048, 32), "b": (8, 2048, 64), "c": (1, 16384, 64)}

# small problems for interpret-mode tests: (B, L, H, N, P, S), chunk in tokens
TEST_SHAPE = dict(B=2, L=40, H=4, N=32, P=16, S=8, chunk=16)
