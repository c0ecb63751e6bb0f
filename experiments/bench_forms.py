"""Compare the three XLA forms of the Mamba-3 SSM (reference scan, associative scan, chunked),
forward and forward+backward, against the roofline measured in the same run (the device's fastest
copy and fastest bf16 matmul: `mamba3_jax.benchmark.measure_ceilings`).

    python experiments/bench_forms.py [--quick] [--reps N]

Run on the GPU machine; results go to docs/benchmarks.md by hand (device, commit, command).
"""

from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp

from mamba3_jax.benchmark import (
    device_name,
    git_commit,
    markdown_table,
    measure_ceilings,
    time_fn,
)
from mamba3_jax.ops.ssm import SSMInputs, SSMState, ssm


def make_inputs(key, B, L, R, H, P, N, S, dtype):
    ks = jax.random.split(key, 8)
    dt = jax.nn.softplus(jax.random.normal(ks[4], (B, L, H)) - 3.0)
    lam = jax.nn.sigmoid(jax.random.normal(ks[6], (B, L, H)))
    inp = SSMInputs(
        q=jax.random.normal(ks[0], (B, L, R, 1, N), dtype),
        k=jax.random.normal(ks[1], (B, L, R, 1, N), dtype),
        x=jax.random.normal(ks[2], (B, L, H, P), dtype),
        angle_inc=jax.random.normal(ks[3], (B, L, H, S)) * 0.1,
        log_decay=-dt * jax.nn.softplus(jax.random.normal(ks[5], (B, L, H))),
        gamma=lam * dt, eta=(1 - lam) * dt,
        q_bias=jnp.ones((H, R, N)), k_bias=jnp.ones((H, R, N)))
    state = SSMState.zeros(B, H, P, N, S, R, dtype=dtype)
    mimo_x = jnp.full((H, R, P), 1.0 / R) if R > 1 else None
    return inp, state, mimo_x


def costs(B, L, R, H, P, N, S, C, dtype):
    """Fewest bytes a fused chunked forward must move and the chunked form's FLOPs."""
    item = jnp.dtype(dtype).itemsize
    tokens = B * L
    bytes_fwd = tokens * (2 * R * N * item + H * P * item + 4 * H * (3 + S) + 4 * R * H * P)
    flops_fwd = tokens * H * (2 * C * R * R * (N + P) + 4 * R * P * N)
    return bytes_fwd, flops_fwd


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="small shapes (smoke test)")
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()

    ceil = measure_ceilings(1 << 28 if args.quick else 1 << 30, 2048 if args.quick else 8192)
    print(f"device {device_name()} commit {git_commit()}: ceilings {ceil.summary()}\n"
          f"{ceil.detail()}")

    cases = [  # (name, B, L, R, H, P, N, chunk, dtype, forms)
        ("SISO f32 B2 L2048 H16", 2, 2048, 1, 16, 64, 128, 64, jnp.float32,
         ("reference", "associative", "chunked")),
        ("SISO bf16 B8 L2048 H32", 8, 2048, 1, 32, 64, 128, 64, jnp.bfloat16,
         ("reference", "chunked")),
        ("SISO bf16 B8 L2048 H64", 8, 2048, 1, 64, 64, 128, 64, jnp.bfloat16, ("chunked",)),
        ("SISO bf16 B1 L16384 H64", 1, 16384, 1, 64, 64, 128, 64, jnp.bfloat16, ("chunked",)),
        ("MIMO4 bf16 B8 L2048 H32", 8, 2048, 4, 32, 64, 128, 16, jnp.bfloat16,
         ("reference", "chunked")),
    ]
    if args.quick:  # tiny shapes, same dtypes and ranks
        cases = [(n.split()[0] + " " + n.split()[1] + " B1 L256 H4 N64", 1, 256, r, 4, 64, 64, c,
                  d, f) for n, _, _, r, _, _, _, c, d, f in cases[:1] + cases[-1:]]

    rows = []
    for name, B, L, R, H, P, N, C, dtype, forms in cases:
        S = N // 4
        sets = [make_inputs(jax.random.PRNGKey(i), B, L, R, H, P, N, S, dtype) for i in range(2)]
        nbytes, flops = costs(B, L, R, H, P, N, S, C, dtype)
        floor_ms = 1e3 * ceil.floor_s(nbytes, flops)
        for form in forms:
            run = functools.partial(ssm, form=form, chunk_size=C)
            fwd = jax.jit(lambda i, s, m, run=run: run(i, s, m)[0])

            def loss(i, s, m, run=run):
                y, f = run(i, s, m)
                return jnp.sum(y.astype(jnp.float32) ** 2) + jnp.sum(f.h)

            fwd_bwd = jax.jit(jax.grad(loss, argnums=(0,)))
            try:
                t_f = time_fn(fwd, sets, reps=args.reps)
                t_fb = time_fn(fwd_bwd, sets, reps=max(3, args.reps // 2))
            except Exception as e:  # out of memory at large shapes (associative form)
                print(f"{name} {form}: failed: {type(e).__name__}: {str(e)[:120]}")
                continue
            rows.append([name, form, f"{t_f:.3f}", f"{t_fb:.3f}", f"{floor_ms:.3f}",
                         f"{t_f / floor_ms:.1f}x"])
            print(rows[-1], flush=True)

    print()
    print(markdown_table(["case", "form", "fwd ms", "fwd+bwd ms", "fwd roofline ms",
                          "fwd / roofline"], rows))
    print(f"\nroofline = max(bytes / {ceil.copy / 1e9:.1f} GB/s, FLOPs / "
          f"{ceil.matmul / 1e12:.2f} TFLOP/s); "
          f"bytes: q, k per B/C group, x, scalars, f32 y; FLOPs of the chunked form")


if __name__ == "__main__":
    main()
