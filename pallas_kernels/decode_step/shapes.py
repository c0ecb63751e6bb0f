"""Named shapes shared by the tests and the benchmark of the decode step."""

# B, H, P of the decode-step benchmark (issue 10: batch 128, d_model 2048, expand 2, P 64); the
# benchmark runs it at N 128 and 64 (S = N / 4), one B/C group with per-head biases
STEP_SHAPE = dict(B=128, H=64, P=64)
STEP_D_STATES = (128, 64)

# small problems for the kernel tests (interpret mode is slow): P 32 splits into blocks of 8
# and 16 rows, N 32 with S 8 or 16 leaves plain and rotated channels
TEST_SHAPE = dict(B=3, H=4, N=32, P=32)
