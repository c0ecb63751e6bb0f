"""Check mamba3-jax against the official PyTorch reference functions of `state-spaces/mamba`.

    python experiments/compare_official.py --mamba-repo /path/to/mamba [--seed 0]

`--mamba-repo` is a checkout (or `git archive`) of https://github.com/state-spaces/mamba. Nothing
of it is copied here: at run time the script parses the reference files with `ast`, keeps only
the pure torch / einops / math imports and the wanted function definitions (plus the top-level
helpers they call), and executes them in a fresh namespace, so the Triton / TileLang / CuTe
kernels those files import are never needed. Needs CPU torch and einops.

Reference functions used (file: functions):
  tests/ops/triton/test_mamba3_siso.py     mamba3_siso_step_ref, mamba3_siso_fwd_ref
  tests/ops/tilelang/test_mamba3_mimo.py   mamba3_MIMO_step_ref, mamba3_MIMO_chunk_ref,
                                           apply_angle_dt_reference
  mamba_ssm/ops/triton/mamba3/mamba3_mimo_rotary_step.py  apply_rotary_qk_inference_reference
  mamba_ssm/ops/triton/layernorm_gated.py  rms_norm_ref   (what RMSNormGated computes)
  mamba_ssm/modules/mamba3.py              heavy_tail_activation
  mamba_ssm/modules/ssd_minimal.py         ssd_minimal_discrete

Comparisons (ours in float32, the reference in float64 by default, both on the same float32
random inputs):
  A  SISO SSM: step ref and fwd ref (with Z and D, with and without input states) vs our three
     `ssm` forms + `gate_output`; final angle, SSM, K and V states.
  B  MIMO SSM (R = 4): the step ref (adjacent rotary pairs, like ours) on our layout, and the
     chunk ref in the kernel convention (pairs (i, i + N/2)) on inputs permuted with
     `mimo_channel_permutation`; with and without the fused pre-gate RMSNorm.
  P  packed documents: the reference's varlen mode (cu_seqlens; the MIMO step ref run per
     document) vs our `reset` flags.
  C  decode-time rotary (the reference layer's `step`): pairwise (SISO) and halved (MIMO).
  D  the whole mixer: our `Mamba3` module with random weights, exported to the reference layer's
     parameter layout, vs the reference layer's math (`Mamba3.forward` glue in torch, below)
     feeding the reference functions; ours also as prefill + token-by-token `step`.
  M  the whole language model through the checkpoint converter: our `Mamba3LM` (SISO, MIMO,
     Mamba-2; scanned layers) exported with `mamba3_jax.convert.to_official` to a
     `MambaLMHeadModel` state dict, run by that model's glue (embedding, pre-norm blocks,
     GatedMLP, final norm, LM head; written in torch below) with each mixer computed by the
     reference functions (Mamba-3: as in D, MIMO in the kernels' channel pairing; Mamba-2:
     causal conv1d, `ssd_minimal_discrete`, gated RMSNorm); logits compared.

Errors: max |ours - ref| / max |ref| per quantity; angles: max circular distance / 2 pi. The
script exits 1 if any counted error exceeds --tol (default 1e-4).
"""

from __future__ import annotations

import argparse
import ast
import math
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from mamba3_jax.config import ModelConfig  # noqa: E402
from mamba3_jax.convert import mimo_channel_permutation  # noqa: E402
from mamba3_jax.ops.discretization import discretize  # noqa: E402
from mamba3_jax.ops.mixer import gate_output  # noqa: E402
from mamba3_jax.ops.rotary import TWO_PI, data_dependent_increments, rotate  # noqa: E402
from mamba3_jax.ops.ssm import SSMInputs, SSMState, lift, ssm  # noqa: E402

FORMS = ("reference", "associative", "chunked")
OUR_CHUNK = 16  # our chunked form; L = 40 is not a multiple, so its padding path runs too
REF_CHUNK = 8  # the MIMO chunk ref needs L to be a multiple of its chunk size

# jitted once per shape (eager dispatch would compile every primitive separately)
run_ssm = jax.jit(ssm, static_argnames=("form", "chunk_size"))
run_gate = jax.jit(gate_output)

# ----------------------------------------------------------------------------- loading

PURE_MODULES = ("math", "typing", "einops", "torch")
REFERENCE_FILES = {
    "tests/ops/triton/test_mamba3_siso.py": ("mamba3_siso_step_ref", "mamba3_siso_fwd_ref"),
    "tests/ops/tilelang/test_mamba3_mimo.py": ("mamba3_MIMO_step_ref", "mamba3_MIMO_chunk_ref",
                                               "apply_angle_dt_reference"),
    "mamba_ssm/ops/triton/mamba3/mamba3_mimo_rotary_step.py": (
        "apply_rotary_qk_inference_reference",),
    "mamba_ssm/ops/triton/layernorm_gated.py": ("rms_norm_ref",),
    "mamba_ssm/modules/mamba3.py": ("heavy_tail_activation",),
    "mamba_ssm/modules/ssd_minimal.py": ("ssd_minimal_discrete",),
}


def _is_pure_import(node: ast.stmt) -> bool:
    if isinstance(node, ast.Import):
        return all(a.name.split(".")[0] in PURE_MODULES for a in node.names)
    if isinstance(node, ast.ImportFrom):
        return node.level == 0 and (node.module or "").split(".")[0] in PURE_MODULES
    return False


def _bound_names(node: ast.stmt) -> set[str]:
    return {(a.asname or a.name).split(".")[0] for a in node.names}


def _attribute_root(expr: ast.expr):
    while isinstance(expr, ast.Attribute):
        expr = expr.value
    return expr.id if isinstance(expr, ast.Name) else None


def load_functions(path: Path, wanted) -> dict:
    """The named top-level functions of a Python file, executed without its other imports.

    Keeps: imports of PURE_MODULES, module-level aliases of them (`F = torch.nn.functional`),
    the wanted function definitions and every top-level function they reference by name."""
    tree = ast.parse(path.read_text(), filename=str(path))
    funcs = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
    keep, todo = set(), list(wanted)
    while todo:
        name = todo.pop()
        if name in keep:
            continue
        if name not in funcs:
            raise KeyError(f"{path}: no top-level function {name!r}")
        keep.add(name)
        todo.extend(n.id for n in ast.walk(funcs[name])
                    if isinstance(n, ast.Name) and n.id in funcs and n.id not in keep)
    body, bound = [], set()
    for node in tree.body:
        if _is_pure_import(node):
            body.append(node)
            bound |= _bound_names(node)
        elif (isinstance(node, ast.Assign) and len(node.targets) == 1
              and isinstance(node.targets[0], ast.Name)
              and isinstance(node.value, ast.Attribute) and _attribute_root(node.value) in bound):
            body.append(node)
        elif isinstance(node, ast.FunctionDef) and node.name in keep:
            body.append(node)
    namespace = {"__name__": "mamba_reference." + path.stem, "__file__": str(path)}
    exec(compile(ast.Module(body=body, type_ignores=[]), str(path), "exec"), namespace)
    return {name: namespace[name] for name in wanted}


class Reference:
    """The reference functions, loaded from a user-supplied checkout."""

    def __init__(self, repo: Path):
        self.repo = repo
        for rel, names in REFERENCE_FILES.items():
            path = repo / rel
            if not path.is_file():
                raise FileNotFoundError(f"{path} not found: is --mamba-repo a state-spaces/mamba "
                                        "checkout with Mamba-3?")
            for name, fn in load_functions(path, names).items():
                setattr(self, name, fn)

    def commit(self) -> str:
        try:
            out = subprocess.run(["git", "-C", str(self.repo), "log", "-1", "--format=%h %cs"],
                                 capture_output=True, text=True, check=True)
            return out.stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return "unknown (not a git checkout)"


# ----------------------------------------------------------------------------- results


@dataclass
class Row:
    section: str
    name: str
    errs: dict = field(default_factory=dict)
    counted: bool = True


COLUMNS = ("y", "angle", "h", "k", "v")


def rel(ours, ref) -> float:
    a = np.asarray(ours, np.float64)
    b = np.asarray(ref, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch {a.shape} vs {b.shape}")
    if not np.all(np.isfinite(a)):
        return math.inf
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def angle_err(ours, ref) -> float:
    d = np.asarray(ours, np.float64) - np.asarray(ref, np.float64)
    d = np.remainder(d + math.pi, TWO_PI) - math.pi
    return float(np.max(np.abs(d)) / TWO_PI)


def tnp(t):
    return t.detach().cpu().numpy().astype(np.float64)


def our_state_errs(st: SSMState, angle, h, k, v, mimo_x=None) -> dict:
    """Our final state vs reference states already in our layout: angle (B, H, S),
    h (B, H, P, N), k (B, R, H, N), v (B, H, P) raw x or (B, R, H, P) lifted by mimo_x (the
    MIMO step ref's V_State; ours stores raw x, so it is compared as lift(x_prev, mimo_x))."""
    ours_v = st.x_prev if np.ndim(v) == 3 else lift(st.x_prev, mimo_x)
    return {"angle": angle_err(st.angle, angle), "h": rel(st.h, h), "k": rel(st.k_prev, k),
            "v": rel(ours_v, v)}


# ----------------------------------------------------------------------------- shared inputs


class Torch:
    """numpy float32 -> torch in the reference dtype."""

    def __init__(self, dtype):
        import torch

        self.torch = torch
        self.dtype = dtype

    def __call__(self, a):
        return self.torch.from_numpy(np.asarray(a, np.float64)).to(self.dtype)


def raw_disc(rng, B, L, H):
    """Raw per-head projections (B, L, H) as the in_proj would give them, and a dt bias."""
    return dict(dd_dt=rng.standard_normal((B, L, H)).astype(np.float32) * 0.5,
                dd_A=rng.standard_normal((B, L, H)).astype(np.float32),
                trap=rng.standard_normal((B, L, H)).astype(np.float32),
                dt_bias=(rng.standard_normal(H) * 0.5 - 1.5).astype(np.float32))


def ref_disc(ref: Reference, tt: Torch, raw, a_floor=1e-4):
    """ADT, DT, Trap (B, H, L) exactly as the reference layer's forward computes them."""
    torch = tt.torch
    A = torch.clamp(-ref.heavy_tail_activation(tt(raw["dd_A"])), max=-a_floor)
    DT = torch.nn.functional.softplus(tt(raw["dd_dt"]) + tt(raw["dt_bias"]))
    return ((A * DT).transpose(1, 2).contiguous(), DT.transpose(1, 2).contiguous(),
            tt(raw["trap"]).transpose(1, 2).contiguous())


def our_inputs(q, k, x, angles, raw, q_bias, k_bias) -> SSMInputs:
    """Our SSMInputs from group-level q, k (B, L, R, G, N), shared angles (B, L, S)."""
    disc = discretize(jnp.asarray(raw["dd_dt"]), jnp.asarray(raw["dd_A"]),
                      jnp.asarray(raw["trap"]), jnp.asarray(raw["dt_bias"]),
                      a_activation_kind="heavy_tail", a_floor=1e-4, discretization="trapezoid")
    return SSMInputs(q=jnp.asarray(q), k=jnp.asarray(k), x=jnp.asarray(x),
                     angle_inc=data_dependent_increments(jnp.asarray(angles), disc.dt),
                     log_decay=disc.log_decay, gamma=disc.gamma, eta=disc.eta,
                     q_bias=jnp.asarray(q_bias), k_bias=jnp.asarray(k_bias))


def heads(angles, H):
    """Shared angles (B, L, S) -> per head (B, L, H, S), as the reference layer expands them."""
    return angles.unsqueeze(-2).expand(-1, -1, H, -1).contiguous()


def chunk_cumsum(ADT, chunk):
    """dA_cs and dA_cs_rev (B, H, L) of the MIMO chunk ref: cumulative sums within chunks."""
    import torch
    from einops import rearrange

    cs = torch.cumsum(rearrange(ADT, "b h (n c) -> b h n c", c=chunk), dim=-1)
    B, H, L = ADT.shape
    return cs.reshape(B, H, L), (cs[..., -1:] - cs).reshape(B, H, L)


def varlen_chunk_cumsum(ADT, cu, chunk):
    """chunk_cumsum per document (boundaries at cu), concatenated back to (B, H, L)."""
    import torch

    parts = []
    for s, e in zip(cu[:-1], cu[1:], strict=True):
        padded = torch.nn.functional.pad(ADT[..., s:e], (0, (-(e - s)) % chunk))
        parts.append([c[..., :e - s] for c in chunk_cumsum(padded, chunk)])
    return tuple(torch.cat(c, dim=-1) for c in zip(*parts, strict=True))


def permute_state_axis(a, index):
    return np.take(np.asarray(a), index, axis=-1)


# ----------------------------------------------------------------------------- A: SISO SSM


def section_siso(ref: Reference, tt: Torch, seed: int, rope_fraction: float) -> list[Row]:
    rng = np.random.default_rng(seed)
    B, L, H, G, P, N = 2, 40, 4, 2, 8, 16
    S = int(N * rope_fraction) // 2
    f = np.float32
    q = rng.standard_normal((B, L, G, N)).astype(f)
    k = rng.standard_normal((B, L, G, N)).astype(f)
    x = rng.standard_normal((B, L, H, P)).astype(f)
    z = rng.standard_normal((B, L, H, P)).astype(f)
    angles = (rng.standard_normal((B, L, S)) * 2).astype(f)
    q_bias = rng.standard_normal((H, N)).astype(f)
    k_bias = rng.standard_normal((H, N)).astype(f)
    D = rng.standard_normal(H).astype(f)
    raw = raw_disc(rng, B, L, H)
    s0 = dict(angle=rng.uniform(0, TWO_PI, (B, H, S)).astype(f),
              h=rng.standard_normal((B, H, P, N)).astype(f),
              k=rng.standard_normal((B, H, N)).astype(f),
              v=rng.standard_normal((B, H, P)).astype(f))

    ADT, DT, Trap = ref_disc(ref, tt, raw)
    args = dict(Q=tt(q), K=tt(k), V=tt(x), ADT=ADT, DT=DT, Trap=Trap, Q_bias=tt(q_bias),
                K_bias=tt(k_bias), Angles=heads(tt(angles), H), D=tt(D), Z=tt(z))
    inp = our_inputs(q[:, :, None], k[:, :, None], x, angles, raw, q_bias[:, None],
                     k_bias[:, None])
    rows = []
    tag = f"SISO rope={rope_fraction}"
    for with_state in (False, True):
        states = (tuple(tt(s0[n]) for n in ("angle", "h", "k", "v")) if with_state else None)
        y_step, st_step = ref.mamba3_siso_step_ref(**args, Input_States=states)
        y_fwd, st_fwd = ref.mamba3_siso_fwd_ref(**args, Initial_States=states, dtype=tt.dtype)
        if with_state:
            ours0 = SSMState(angle=jnp.asarray(s0["angle"]), h=jnp.asarray(s0["h"]),
                             k_prev=jnp.asarray(s0["k"])[:, None], x_prev=jnp.asarray(s0["v"]))
        else:
            ours0 = SSMState.zeros(B, H, P, N, S, 1)
        st_tag = "input states" if with_state else "zero states"
        ref_states = {"step": st_step, "fwd": st_fwd}
        ref_ys = {"step": y_step, "fwd": y_fwd}
        for form in FORMS:
            y, fin = run_ssm(inp, ours0, None, form=form, chunk_size=OUR_CHUNK)
            out = run_gate(y, inp.x, jnp.asarray(z), jnp.asarray(D))
            for rname in ("step", "fwd"):
                a, h, kk, v = ref_states[rname]
                errs = {"y": rel(out, tnp(ref_ys[rname]))}
                errs.update(our_state_errs(fin, tnp(a), tnp(h), tnp(kk)[:, None], tnp(v)))
                rows.append(Row("A", f"{tag}, {st_tag}: ours[{form}] vs {rname}_ref", errs))
        a, h, kk, v = st_fwd
        a2, h2, kk2, v2 = st_step
        rows.append(Row("A", f"{tag}, {st_tag}: step_ref vs fwd_ref (reference self-check)",
                        {"y": rel(tnp(y_fwd), tnp(y_step)), "angle": angle_err(tnp(a), tnp(a2)),
                         "h": rel(tnp(h), tnp(h2)), "k": rel(tnp(kk), tnp(kk2)),
                         "v": rel(tnp(v), tnp(v2))}))
    return rows


# ----------------------------------------------------------------------------- B: MIMO SSM


def section_mimo(ref: Reference, tt: Torch, seed: int, rope_fraction: float) -> list[Row]:
    torch = tt.torch
    rng = np.random.default_rng(seed + 1)
    B, L, R, H, G, P, N = 2, 40, 4, 4, 2, 8, 16
    S = int(N * rope_fraction) // 2
    f = np.float32
    q = rng.standard_normal((B, L, R, G, N)).astype(f)
    k = rng.standard_normal((B, L, R, G, N)).astype(f)
    x = rng.standard_normal((B, L, H, P)).astype(f)
    z = rng.standard_normal((B, L, H, P)).astype(f)
    angles = (rng.standard_normal((B, L, S)) * 2).astype(f)
    q_bias = rng.standard_normal((H, R, N)).astype(f)
    k_bias = rng.standard_normal((H, R, N)).astype(f)
    mimo_x = ((1 + 0.5 * rng.standard_normal((H, R, P))) / R).astype(f)
    mimo_z = (1 + 0.5 * rng.standard_normal((H, R, P))).astype(f)
    mimo_o = ((1 + 0.5 * rng.standard_normal((H, R, P))) / R).astype(f)
    D = rng.standard_normal(H).astype(f)
    norm_w = (1 + 0.3 * rng.standard_normal((H, P))).astype(f)
    raw = raw_disc(rng, B, L, H)
    s0 = dict(angle=rng.uniform(0, TWO_PI, (B, H, S)).astype(f),
              h=rng.standard_normal((B, H, P, N)).astype(f),
              k=rng.standard_normal((B, R, H, N)).astype(f),  # ours: (B, R, H, N)
              x=rng.standard_normal((B, H, P)).astype(f))  # ours: raw x

    ADT, DT, Trap = ref_disc(ref, tt, raw)
    inp = our_inputs(q, k, x, angles, raw, q_bias, k_bias)
    jz, jD = jnp.asarray(z), jnp.asarray(D)
    jmx, jmz, jmo = jnp.asarray(mimo_x), jnp.asarray(mimo_z), jnp.asarray(mimo_o)
    tag = f"MIMO R={R} rope={rope_fraction}"
    rows = []

    def ours(state, fused, form):
        y, fin = run_ssm(inp, state, jmx, form=form, chunk_size=OUR_CHUNK)
        out = run_gate(y, inp.x, jz, jD, jmx, jmz, jmo,
                          jnp.asarray(norm_w) if fused else None)
        return out, fin

    # step ref: adjacent pairs (its apply_rotary_emb views (..., N/2, 2)), our layout as is
    for with_state in (False, True):
        if with_state:
            states = (tt(s0["angle"]), tt(s0["h"]), tt(s0["k"]).permute(0, 2, 1, 3).contiguous(),
                      torch.einsum("bhp,hrp->bhrp", tt(s0["x"]), tt(mimo_x)))
            ours0 = SSMState(angle=jnp.asarray(s0["angle"]), h=jnp.asarray(s0["h"]),
                             k_prev=jnp.asarray(s0["k"]), x_prev=jnp.asarray(s0["x"]))
        else:
            states, ours0 = None, SSMState.zeros(B, H, P, N, S, R)
        for fused in (False, True):
            y_ref, (a, h, kk, v) = ref.mamba3_MIMO_step_ref(
                Q=tt(q), K=tt(k), V=tt(x), ADT=ADT, DT=DT, Trap=Trap, Q_bias=tt(q_bias),
                K_bias=tt(k_bias), Angles=heads(tt(angles), H), MIMO_V=tt(mimo_x),
                # the fused-norm branch casts to float32 before contracting with MIMO_O
                MIMO_O=tt(mimo_o).float() if fused else tt(mimo_o), D=tt(D), Z=tt(z),
                MIMO_Z=tt(mimo_z), Input_States=states, fused_norm=fused,
                outproj_norm_weight=tt(norm_w) if fused else None)
            for form in FORMS:
                out, fin = ours(ours0, fused, form)
                errs = {"y": rel(out, tnp(y_ref)), "angle": angle_err(fin.angle, tnp(a)),
                        "h": rel(fin.h, tnp(h)),
                        "k": rel(fin.k_prev, tnp(kk.permute(0, 2, 1, 3))),
                        # the step ref keeps V lifted per rank: compare x_prev * mimo_x
                        "v": rel(lift(fin.x_prev, jmx), tnp(v.permute(0, 2, 1, 3)))}
                name = (f"{tag}, {'input' if with_state else 'zero'} states"
                        f"{', fused norm' if fused else ''}: ours[{form}] vs MIMO_step_ref")
                rows.append(Row("B", name, errs))

    # chunk ref, kernel convention (pairs (i, i + N/2)): feed it our inputs in reference layout
    perm = mimo_channel_permutation(N, S)
    inv = np.argsort(perm)  # reference[..., m] = ours[..., inv[m]]
    dA_cs, dA_cs_rev = chunk_cumsum(ADT, REF_CHUNK)
    theta = ref.apply_angle_dt_reference(heads(tt(angles), H), DT.transpose(1, 2))
    for permuted in (True, False):
        index = inv if permuted else np.arange(N)
        for fused in ((False, True) if permuted else (False,)):
            y_ref, h_ref, k_ref = ref.mamba3_MIMO_chunk_ref(
                tt(permute_state_axis(q, index)), tt(permute_state_axis(k, index)), tt(x),
                tt(permute_state_axis(q_bias, index)), tt(permute_state_axis(k_bias, index)),
                tt(mimo_x), tt(mimo_o), tt(z), tt(mimo_z), theta, dA_cs, dA_cs_rev, DT, Trap,
                tt(D), chunk_size=REF_CHUNK, rotary_dim_divisor=int(2 / rope_fraction),
                return_final_state=True, dtype=tt.dtype, rotate_pairwise=False,
                fused_norm=fused, outproj_norm_weight=tt(norm_w) if fused else None)
            back = perm if permuted else np.arange(N)  # ours[..., n] = reference[..., perm[n]]
            h_ours_layout = permute_state_axis(tnp(h_ref.transpose(-1, -2)), back)  # (B,H,P,N)
            k_ours_layout = permute_state_axis(tnp(k_ref), back)  # (B, R, H, N)
            for form in FORMS:
                out, fin = ours(SSMState.zeros(B, H, P, N, S, R), fused, form)
                errs = {"y": rel(out, tnp(y_ref)), "h": rel(fin.h, h_ours_layout),
                        "k": rel(fin.k_prev, k_ours_layout)}
                if permuted:
                    name = (f"{tag}, zero states{', fused norm' if fused else ''}: "
                            f"ours[{form}] vs MIMO_chunk_ref (kernel pairing, permuted inputs)")
                    rows.append(Row("B", name, errs))
                elif form == "chunked":
                    name = (f"{tag}: ours vs MIMO_chunk_ref on UNpermuted inputs "
                            "(expected to differ: shows the permutation is needed)")
                    rows.append(Row("B", name, errs, counted=False))
    return rows


# ----------------------------------------------------------------------------- P: packed sequences


def section_packed(ref: Reference, tt: Torch, seed: int) -> list[Row]:
    """Packed documents: the reference's cu_seqlens (varlen) vs our `reset` flags."""
    torch = tt.torch
    rng = np.random.default_rng(seed + 3)
    L, H, G, P, N, S = 40, 4, 2, 8, 16, 4
    lens = (13, 19, 8)
    cu = np.concatenate([[0], np.cumsum(lens)])
    docs = list(zip(cu[:-1], cu[1:], strict=True))
    reset = np.zeros((1, L), bool)
    reset[0, cu[1:-1]] = True
    f = np.float32
    rows = []
    for R in (1, 4):
        q = rng.standard_normal((1, L, R, G, N)).astype(f)
        k = rng.standard_normal((1, L, R, G, N)).astype(f)
        x = rng.standard_normal((1, L, H, P)).astype(f)
        z = rng.standard_normal((1, L, H, P)).astype(f)
        angles = (rng.standard_normal((1, L, S)) * 2).astype(f)
        q_bias = rng.standard_normal((H, R, N)).astype(f)
        k_bias = rng.standard_normal((H, R, N)).astype(f)
        D = rng.standard_normal(H).astype(f)
        raw = raw_disc(rng, 1, L, H)
        ADT, DT, Trap = ref_disc(ref, tt, raw)
        inp = our_inputs(q, k, x, angles, raw, q_bias, k_bias)._replace(reset=jnp.asarray(reset))
        zero = SSMState.zeros(1, H, P, N, S, R)
        Ang = heads(tt(angles), H)
        if R == 1:
            args = dict(Q=tt(q[:, :, 0]), K=tt(k[:, :, 0]), V=tt(x), ADT=ADT, DT=DT, Trap=Trap,
                        Q_bias=tt(q_bias[:, 0]), K_bias=tt(k_bias[:, 0]), Angles=Ang, D=tt(D),
                        Z=tt(z))
            y_ref, (a, h, kk, v) = ref.mamba3_siso_fwd_ref(
                **args, dtype=tt.dtype, cu_seqlens=torch.as_tensor(cu))
            refs = {"fwd_ref(cu_seqlens)": (y_ref, (a[-1:], h[-1:], kk[-1:, None], v[-1:]))}
            mx = mz = mo = None
        else:
            mimo_x = ((1 + 0.5 * rng.standard_normal((H, R, P))) / R).astype(f)
            mimo_z = (1 + 0.5 * rng.standard_normal((H, R, P))).astype(f)
            mimo_o = ((1 + 0.5 * rng.standard_normal((H, R, P))) / R).astype(f)
            mx, mz, mo = jnp.asarray(mimo_x), jnp.asarray(mimo_z), jnp.asarray(mimo_o)
            # the MIMO step ref has no varlen mode: run it per document
            outs = []
            for s, e in docs:
                y_s, (a, h, kk, v) = ref.mamba3_MIMO_step_ref(
                    Q=tt(q[:, s:e]), K=tt(k[:, s:e]), V=tt(x[:, s:e]), ADT=ADT[..., s:e],
                    DT=DT[..., s:e], Trap=Trap[..., s:e], Q_bias=tt(q_bias), K_bias=tt(k_bias),
                    Angles=Ang[:, s:e], MIMO_V=tt(mimo_x), MIMO_O=tt(mimo_o), D=tt(D),
                    Z=tt(z[:, s:e]), MIMO_Z=tt(mimo_z))
                outs.append(y_s)
            last = (a, h, kk.permute(0, 2, 1, 3), v.permute(0, 2, 1, 3))  # v lifted per rank
            refs = {"MIMO_step_ref per document": (torch.cat(outs, dim=1), last)}
            # the chunk ref's varlen mode, kernel pairing: chunk sums restart at each document
            inv = np.argsort(mimo_channel_permutation(N, S))
            dA_cs, dA_rev = varlen_chunk_cumsum(ADT, cu, REF_CHUNK)
            theta = torch.cat([ref.apply_angle_dt_reference(Ang[:, s:e], DT[..., s:e].mT)
                               for s, e in docs], dim=1)
            y_chunk, _, _ = ref.mamba3_MIMO_chunk_ref(
                tt(permute_state_axis(q, inv)), tt(permute_state_axis(k, inv)), tt(x),
                tt(permute_state_axis(q_bias, inv)), tt(permute_state_axis(k_bias, inv)),
                tt(mimo_x), tt(mimo_o), tt(z), tt(mimo_z), theta, dA_cs, dA_rev, DT, Trap, tt(D),
                chunk_size=REF_CHUNK, rotary_dim_divisor=N // S,
                dtype=tt.dtype, rotate_pairwise=False, cu_seqlens=torch.as_tensor(cu))
            refs["MIMO_chunk_ref(cu_seqlens, kernel pairing)"] = (y_chunk, None)
        for form in FORMS:
            y, fin = run_ssm(inp, zero, mx, form=form, chunk_size=OUR_CHUNK)
            out = run_gate(y, inp.x, jnp.asarray(z), jnp.asarray(D), mx, mz, mo)
            for rname, (y_ref, st) in refs.items():
                errs = {"y": rel(out, tnp(y_ref))}
                if st is not None:
                    errs.update(our_state_errs(fin, *(tnp(t) for t in st), mimo_x=mx))
                rows.append(Row("P", f"packed R={R} docs {lens}: ours[{form}] (reset) vs {rname}",
                                errs))
    return rows


# ----------------------------------------------------------------------------- C: decode rotary


def section_rotary(ref: Reference, tt: Torch, seed: int) -> list[Row]:
    rng = np.random.default_rng(seed + 2)
    B, R, H, N = 3, 4, 5, 16
    f = np.float32
    rows = []
    for rope_fraction in (0.5, 1.0):
        S = int(N * rope_fraction) // 2
        q = rng.standard_normal((B, R, H, N)).astype(f)
        k = rng.standard_normal((B, R, H, N)).astype(f)
        bq = rng.standard_normal((R, H, N)).astype(f)
        bk = rng.standard_normal((R, H, N)).astype(f)
        state = rng.uniform(0, TWO_PI, (B, H, S)).astype(f)
        proj = (rng.standard_normal((B, S)) * 2).astype(f)
        dt = rng.uniform(0.01, 0.5, (B, H)).astype(f)
        theta = jnp.asarray(state) + data_dependent_increments(jnp.asarray(proj), jnp.asarray(dt))
        q_ours = rotate(jnp.asarray(q) + jnp.asarray(bq), theta[:, None])
        k_ours = rotate(jnp.asarray(k) + jnp.asarray(bk), theta[:, None])
        perm = mimo_channel_permutation(N, S)
        for pairwise in (True, False):
            index = np.arange(N) if pairwise else np.argsort(perm)
            back = np.arange(N) if pairwise else perm
            qo, ko, ang = ref.apply_rotary_qk_inference_reference(
                tt(permute_state_axis(q, index)), tt(permute_state_axis(k, index)), tt(state),
                tt(proj)[:, None, :].expand(-1, H, -1), tt(dt),
                bias_q=tt(permute_state_axis(bq, index)), bias_k=tt(permute_state_axis(bk, index)),
                conjugate=False, rotate_pairwise=pairwise)
            mode = ("pairwise (SISO decode)" if pairwise
                    else "halved (MIMO decode), permuted inputs")
            rows.append(Row("C", f"rope={rope_fraction}: ours vs rotary_qk_inference_ref, {mode}",
                            {"y": max(rel(q_ours, permute_state_axis(tnp(qo), back)),
                                      rel(k_ours, permute_state_axis(tnp(ko), back))),
                             "angle": angle_err(jnp.mod(theta, TWO_PI), tnp(ang))}))
    return rows


# ----------------------------------------------------------------------------- D: whole mixer


def randomize(model, rng):
    """Random values for the parameters that start constant (norm gains, biases, D, MIMO)."""
    cfg = model.cfg
    H, R, P, N = cfg.nheads, cfg.mimo_rank, cfg.headdim, cfg.d_state

    def set_(var, value):
        var[...] = jnp.asarray(value, jnp.float32)

    set_(model.B_norm, 1 + 0.3 * rng.standard_normal(N))
    set_(model.C_norm, 1 + 0.3 * rng.standard_normal(N))
    set_(model.B_bias, 1 + 0.5 * rng.standard_normal((H, R, N)))
    set_(model.C_bias, 1 + 0.5 * rng.standard_normal((H, R, N)))
    set_(model.D, rng.standard_normal(H))
    if R > 1:
        set_(model.mimo_x, (1 + 0.5 * rng.standard_normal((H, R, P))) / R)
        set_(model.mimo_z, 1 + 0.5 * rng.standard_normal((H, R, P)))
        set_(model.mimo_o, (1 + 0.5 * rng.standard_normal((H, R, P))) / R)
    if cfg.is_outproj_norm:
        set_(model.norm, 1 + 0.3 * rng.standard_normal((H, P)))


def to_reference_state_dict(model, kernel_layout: bool) -> dict:
    """Our Mamba3 parameters under the reference layer's names and layouts (numpy).

    kernel_layout: for MIMO, reorder the N axis of everything B/C-related so that the reference
    kernels' (i, i + N/2) rotary pairs meet our (2i, 2i + 1) pairs (docs/weights.md)."""
    cfg = model.cfg
    E, R, G, N = cfg.d_inner, cfg.mimo_rank, cfg.ngroups, cfg.d_state
    w = np.asarray(model.in_proj.kernel[...], np.float64).T.copy()  # (d_in_proj, d_model)
    index = np.arange(N)
    if kernel_layout and R > 1:
        index = np.argsort(mimo_channel_permutation(N, cfg.num_rope_angles))
        width = R * G * N
        for start in (2 * E, 2 * E + width):  # B rows, then C rows, laid out (r, g, n)
            block = w[start:start + width].reshape(R, G, N, -1)
            w[start:start + width] = block[:, :, index].reshape(width, -1)

    def get(var):
        return np.asarray(var[...], np.float64)

    sd = {"in_proj.weight": w, "dt_bias": get(model.dt_bias), "D": get(model.D),
          "B_norm.weight": get(model.B_norm)[index], "C_norm.weight": get(model.C_norm)[index],
          "B_bias": get(model.B_bias)[..., index], "C_bias": get(model.C_bias)[..., index],
          "out_proj.weight": get(model.out_proj.kernel).T.copy()}
    if R > 1:
        sd.update(mimo_x=get(model.mimo_x), mimo_z=get(model.mimo_z), mimo_o=get(model.mimo_o))
    if cfg.is_outproj_norm:
        sd["norm.weight"] = get(model.norm).reshape(E)
    return sd


def reference_layer(ref: Reference, tt: Torch, sd: dict, u, cfg: ModelConfig, path: str):
    """The reference `Mamba3.forward` (mamba_ssm/modules/mamba3.py), its kernels replaced by the
    reference functions. path: 'siso_step' | 'siso_fwd' | 'mimo_step' | 'mimo_chunk'.
    Returns (out (B, L, d_model), final states as the reference function returns them)."""
    torch = tt.torch
    from einops import rearrange

    E, H, P, N = cfg.d_inner, cfg.nheads, cfg.headdim, cfg.d_state
    G, R, S = cfg.ngroups, cfg.mimo_rank, cfg.num_rope_angles
    p = {name: tt(v) for name, v in sd.items()}
    zx = tt(u) @ p["in_proj.weight"].T
    z, x, Bm, Cm, dd_dt, dd_A, trap, angles = torch.split(
        zx, [E, E, N * G * R, N * G * R, H, H, H, S], dim=-1)
    z = rearrange(z, "b l (h p) -> b l h p", p=P)
    x = rearrange(x, "b l (h p) -> b l h p", p=P)
    Bm = rearrange(Bm, "b l (r g n) -> b l r g n", r=R, g=G)
    Cm = rearrange(Cm, "b l (r g n) -> b l r g n", r=R, g=G)
    trap = rearrange(trap, "b l h -> b h l")
    A = torch.clamp(-ref.heavy_tail_activation(dd_A), max=-cfg.a_floor)
    DT = torch.nn.functional.softplus(dd_dt + p["dt_bias"])
    ADT = rearrange(A * DT, "b l n -> b n l")
    DT = rearrange(DT, "b l n -> b n l")
    angles = angles.unsqueeze(-2).expand(-1, -1, H, -1)
    Bm = ref.rms_norm_ref(Bm, p["B_norm.weight"], None, eps=1e-5)  # RMSNormGated, no z
    Cm = ref.rms_norm_ref(Cm, p["C_norm.weight"], None, eps=1e-5)
    norm = cfg.is_outproj_norm
    if path.startswith("siso"):
        args = dict(Q=Cm.squeeze(2), K=Bm.squeeze(2), V=x, ADT=ADT, DT=DT, Trap=trap,
                    Q_bias=p["C_bias"].squeeze(1), K_bias=p["B_bias"].squeeze(1), Angles=angles,
                    D=p["D"], Z=None if norm else z)
        if path == "siso_step":
            y, states = ref.mamba3_siso_step_ref(**args)
        else:
            y, states = ref.mamba3_siso_fwd_ref(**args, dtype=tt.dtype)
        y = rearrange(y, "b l h p -> b l (h p)")
        if norm:  # self.norm(y, z): RMSNormGated(group_size=headdim, norm_before_gate=True)
            y = ref.rms_norm_ref(y, p["norm.weight"], None, z=rearrange(z, "b l h p -> b l (h p)"),
                                 eps=1e-5, group_size=P, norm_before_gate=True)
    elif path == "mimo_step":
        y, states = ref.mamba3_MIMO_step_ref(
            Q=Cm, K=Bm, V=x, ADT=ADT, DT=DT, Trap=trap, Q_bias=p["C_bias"], K_bias=p["B_bias"],
            Angles=angles, MIMO_V=p["mimo_x"],
            MIMO_O=p["mimo_o"].float() if norm else p["mimo_o"], D=p["D"], Z=z,
            MIMO_Z=p["mimo_z"], fused_norm=norm,
            outproj_norm_weight=p["norm.weight"].view(H, P) if norm else None)
        y = rearrange(y, "b l h p -> b l (h p)")
    elif path == "mimo_chunk":  # what mamba3_mimo_combined computes (fused pre-gate norm)
        dA_cs, dA_cs_rev = chunk_cumsum(ADT, REF_CHUNK)
        theta = ref.apply_angle_dt_reference(angles, DT.transpose(1, 2))
        y, h, k = ref.mamba3_MIMO_chunk_ref(
            Cm, Bm, x, p["C_bias"], p["B_bias"], p["mimo_x"], p["mimo_o"], z, p["mimo_z"], theta,
            dA_cs, dA_cs_rev, DT, trap, p["D"], chunk_size=REF_CHUNK,
            rotary_dim_divisor=int(2 / cfg.rope_fraction), return_final_state=True,
            dtype=tt.dtype, rotate_pairwise=False, fused_norm=norm,
            outproj_norm_weight=p["norm.weight"] if norm else None)
        y = rearrange(y, "b l h p -> b l (h p)")
        states = (h.transpose(-1, -2), k)  # kernel wrapper: SSM state permuted to (B, H, P, N)
    else:
        raise ValueError(path)
    return y.to(p["out_proj.weight"].dtype) @ p["out_proj.weight"].T, states


def section_layer(ref: Reference, tt: Torch, seed: int) -> list[Row]:
    from flax import nnx

    from mamba3_jax.layers import Mamba3

    rows = []
    B, L, L_prefill = 2, 40, 32
    cases = [(1, False), (1, True), (4, False), (4, True)]
    for i, (R, norm) in enumerate(cases):
        rng = np.random.default_rng(seed + 10 + i)
        cfg = ModelConfig(d_model=32, d_state=16, expand=2, headdim=8, ngroups=2, mimo_rank=R,
                          rope_fraction=0.5, is_outproj_norm=norm, a_activation="heavy_tail",
                          dt_min=0.01, dt_max=0.3, chunk_size=OUR_CHUNK, scan_backend="chunked",
                          n_layer=1)
        model = Mamba3(cfg, rngs=nnx.Rngs(seed + i))
        randomize(model, rng)
        u = rng.standard_normal((B, L, cfg.d_model)).astype(np.float32)
        forward = nnx.jit(lambda m, x: m(x))
        step = nnx.jit(lambda m, x, c: m.step(x, c))
        out, cache = forward(model, jnp.asarray(u))
        # prefill, then token-by-token decode through Mamba3.step
        out_pre, c2 = forward(model, jnp.asarray(u[:, :L_prefill]))
        steps = []
        for t in range(L_prefill, L):
            o, c2 = step(model, jnp.asarray(u[:, t]), c2)
            steps.append(o)
        out_dec = jnp.concatenate([out_pre, jnp.stack(steps, axis=1)], axis=1)
        ours_runs = {"forward": (out, cache.ssm), "prefill+step": (out_dec, c2.ssm)}
        tag = f"layer R={R}{' outproj_norm' if norm else ''} (G=2, N=16, P=8, H=8, L={L})"
        mx = model.mimo_x[...] if R > 1 else None
        if R == 1:
            sd = to_reference_state_dict(model, kernel_layout=False)
            for path in ("siso_step", "siso_fwd"):
                y_ref, (a, h, k, v) = reference_layer(ref, tt, sd, u, cfg, path)
                for run, (o, st) in ours_runs.items():
                    errs = {"y": rel(o, tnp(y_ref))}
                    errs.update(our_state_errs(st, tnp(a), tnp(h), tnp(k)[:, None], tnp(v)))
                    rows.append(Row("D", f"{tag}: ours[{run}] vs {path}_ref", errs))
            if not norm:  # the same weights under our default A activation (softplus);
                # y_ref, h are those of the last path above, siso_fwd
                soft = Mamba3(cfg.replace(a_activation="softplus"), rngs=nnx.Rngs(0))
                nnx.update(soft, nnx.state(model))
                o, st = forward(soft, jnp.asarray(u))
                errs = {"y": rel(o, tnp(y_ref)), "h": rel(st.ssm.h, tnp(h))}
                rows.append(Row("D", f"{tag}: ours with default a_activation='softplus' vs "
                                     "siso_fwd_ref (expected to differ: the reference layer "
                                     "hard-codes heavy_tail)", errs, counted=False))
        else:
            sd = to_reference_state_dict(model, kernel_layout=False)
            y_ref, (a, h, k, v) = reference_layer(ref, tt, sd, u, cfg, "mimo_step")
            for run, (o, st) in ours_runs.items():
                errs = {"y": rel(o, tnp(y_ref)), "angle": angle_err(st.angle, tnp(a)),
                        "h": rel(st.h, tnp(h)), "k": rel(st.k_prev, tnp(k.permute(0, 2, 1, 3))),
                        "v": rel(lift(st.x_prev, mx), tnp(v.permute(0, 2, 1, 3)))}
                rows.append(Row("D", f"{tag}: ours[{run}] vs MIMO_step_ref (our layout)", errs))
            sd = to_reference_state_dict(model, kernel_layout=True)
            y_ref, (h, k) = reference_layer(ref, tt, sd, u, cfg, "mimo_chunk")
            perm = mimo_channel_permutation(cfg.d_state, cfg.num_rope_angles)
            for run, (o, st) in ours_runs.items():
                errs = {"y": rel(o, tnp(y_ref)), "h": rel(st.h, permute_state_axis(tnp(h), perm)),
                        "k": rel(st.k_prev, permute_state_axis(tnp(k), perm))}
                rows.append(Row("D", f"{tag}: ours[{run}] vs MIMO_chunk_ref "
                                     "(kernel pairing, converted weights)", errs))
    return rows


# ----------------------------------------------------------------------------- M: whole model


def reference_mamba2_layer(ref: Reference, tt: Torch, sd: dict, u, cfg: ModelConfig):
    """The reference `Mamba2.forward` maths (mamba_ssm/modules/mamba2.py, defaults: no D per
    channel, gated RMSNorm after the gate) with `ssd_minimal_discrete` for the scan."""
    torch = tt.torch
    F = torch.nn.functional
    E, H, P, N, G, K = (cfg.d_inner, cfg.nheads, cfg.headdim, cfg.d_state, cfg.ngroups,
                        cfg.d_conv)
    p = {name: tt(v) for name, v in sd.items()}
    Bsz, L = u.shape[:2]
    z, xbc, dd_dt = torch.split(u @ p["in_proj.weight"].T, [E, E + 2 * G * N, H], dim=-1)
    xbc = F.conv1d(xbc.transpose(1, 2), p["conv1d.weight"], p["conv1d.bias"], padding=K - 1,
                   groups=xbc.shape[-1])[..., :L].transpose(1, 2)
    x, Bm, Cm = torch.split(F.silu(xbc), [E, G * N, G * N], dim=-1)
    dt = F.softplus(dd_dt + p["dt_bias"])
    A = -torch.exp(p["A_log"])
    x = x.reshape(Bsz, L, H, P)
    per_head = [Bsz, L, G, 1, N]  # groups broadcast over their heads
    Bm = Bm.reshape(per_head).expand(Bsz, L, G, H // G, N).reshape(Bsz, L, H, N)
    Cm = Cm.reshape(per_head).expand(Bsz, L, G, H // G, N).reshape(Bsz, L, H, N)
    y, _ = ref.ssd_minimal_discrete(x * dt[..., None], A * dt, Bm, Cm, block_len=REF_CHUNK)
    y = (y + x * p["D"][:, None]).reshape(Bsz, L, E)
    y = ref.rms_norm_ref(y, p["norm.weight"], None, z=z, eps=1e-5, group_size=E // G,
                         norm_before_gate=False).to(tt.dtype)
    return y @ p["out_proj.weight"].T


def reference_mha_layer(tt: Torch, sd: dict, u, attn_cfg: dict):
    """`MHA.forward` (mamba_ssm/modules/mha.py, no cache) in plain torch: fused q/k/v in_proj,
    rotary on `rotary_emb_dim` channels (interleaved = adjacent pairs, inverse frequencies
    base^(-2i/dim), as flash-attn's RotaryEmbedding), kv heads repeated, causal softmax."""
    torch = tt.torch
    N, K, D = attn_cfg["num_heads"], attn_cfg["num_heads_kv"], attn_cfg["head_dim"]
    Bsz, L = u.shape[:2]
    qkv = u @ tt(sd["in_proj.weight"]).T
    q, kv = torch.split(qkv, [N * D, 2 * K * D], dim=-1)
    q = q.reshape(Bsz, L, N, D)
    k, v = kv.reshape(Bsz, L, 2, K, D).unbind(dim=2)
    rot = attn_cfg["rotary_emb_dim"]
    if rot:
        assert attn_cfg["rotary_emb_interleaved"] and rot == D
        inv = attn_cfg["rotary_emb_base"] ** (-torch.arange(0, rot, 2, dtype=tt.dtype) / rot)
        ang = torch.arange(L, dtype=tt.dtype)[:, None] * inv  # (L, D/2)
        cos, sin = torch.cos(ang)[:, None], torch.sin(ang)[:, None]

        def rope(x):
            a, b = x[..., 0::2], x[..., 1::2]
            return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2)

        q, k = rope(q), rope(k)
    k = torch.repeat_interleave(k, N // K, dim=2)
    v = torch.repeat_interleave(v, N // K, dim=2)
    s = torch.einsum("btnd,bsnd->bnts", q, k) / math.sqrt(D)
    s = s.masked_fill(~torch.ones(L, L, dtype=torch.bool).tril(), float("-inf"))
    ctx = torch.einsum("bnts,bsnd->btnd", torch.softmax(s, dim=-1), v).reshape(Bsz, L, N * D)
    return ctx @ tt(sd["out_proj.weight"]).T


def reference_lm(ref: Reference, tt: Torch, sd: dict, tokens, cfg: ModelConfig):
    """`MambaLMHeadModel.forward` (unfused add + norm path of modules/block.py) on an official
    state dict, each mixer computed by the reference functions."""
    from mamba3_jax.convert import official_attn_cfg

    p = {k: tt(v) for k, v in sd.items()}

    def norm(x, key):  # the model's RMSNorm (eps 1e-5), no bias
        return ref.rms_norm_ref(x, p[key], None, eps=1e-5).to(tt.dtype)

    def mixer_sd(i):
        head = f"backbone.layers.{i}.mixer."
        return {k[len(head):]: v for k, v in sd.items() if k.startswith(head)}

    h = p["backbone.embedding.weight"][tt.torch.from_numpy(np.asarray(tokens, np.int64))]
    residual = None
    for i in range(cfg.n_layer):
        pre = f"backbone.layers.{i}."
        residual = h if residual is None else h + residual
        h = norm(residual, pre + "norm.weight")
        if cfg.layer_mixer(i) == "attention":
            h = reference_mha_layer(tt, mixer_sd(i), h, official_attn_cfg(cfg))
        elif cfg.mixer == "mamba2":
            h = reference_mamba2_layer(ref, tt, mixer_sd(i), h, cfg)
        else:
            path = "mimo_chunk" if cfg.mimo_rank > 1 else "siso_fwd"
            h = reference_layer(ref, tt, {k: np.asarray(v, np.float64)
                                          for k, v in mixer_sd(i).items()},
                                h.numpy(), cfg, path)[0]
        residual = h + residual
        h = norm(residual, pre + "norm2.weight")
        value, gate = tt.torch.chunk(h @ p[pre + "mlp.fc1.weight"].T, 2, dim=-1)
        h = (value * tt.torch.nn.functional.silu(gate)) @ p[pre + "mlp.fc2.weight"].T
    h = norm(h + residual, "backbone.norm_f.weight")
    return h @ p["lm_head.weight"].T


def perturb(model, rng, scale: float = 0.2) -> None:
    """Noise on every variable, so the constant-initialised ones (norm gains, biases, D, MIMO
    projections) are checked too."""
    from flax import nnx

    _, state = nnx.split(model)
    nnx.update(model, jax.tree.map(
        lambda x: x + scale * jnp.asarray(rng.standard_normal(x.shape), x.dtype), state))


def section_model(ref: Reference, tt: Torch, seed: int) -> list[Row]:
    from flax import nnx

    from mamba3_jax.convert import model_weights, official_config, to_official
    from mamba3_jax.model import Mamba3LM

    rows = []
    B, L = 2, 24  # a multiple of the reference chunk sizes
    base = dict(vocab_size=64, d_model=32, n_layer=2, d_state=16, expand=2, headdim=8,
                ngroups=2, d_mlp=128, dt_min=0.01, dt_max=0.3, chunk_size=OUR_CHUNK,
                scan_backend="chunked", scan_layers=True)
    cases = [("Mamba-3 SISO", dict(a_activation="heavy_tail")),
             ("Mamba-3 SISO outproj_norm", dict(a_activation="heavy_tail",
                                                 is_outproj_norm=True)),
             ("Mamba-3 MIMO R=4", dict(a_activation="heavy_tail", mimo_rank=4)),
             ("Mamba-3 MIMO R=2 outproj_norm rope 1.0",
              dict(a_activation="heavy_tail", mimo_rank=2, is_outproj_norm=True,
                   rope_fraction=1.0)),
             ("Mamba-2", dict(mixer="mamba2", d_conv=4)),
             ("Transformer++ (RoPE, 4 query / 2 kv heads)",
              dict(mixer="attention", attn_kv_heads=2, scan_layers=True)),
             ("hybrid MA (NoPE attention)", dict(a_activation="heavy_tail", layer_pattern="MA",
                                                 attn_rope=False, scan_layers=False))]
    for i, (name, extra) in enumerate(cases):
        rng = np.random.default_rng(seed + 40 + i)
        cfg = ModelConfig(**{**base, **extra})
        official_config(cfg)  # representable
        model = Mamba3LM(cfg, rngs=nnx.Rngs(seed + i))
        perturb(model, rng)
        tokens = rng.integers(0, cfg.vocab_size, (B, L))
        ours = nnx.jit(lambda m, t: m(t))(model, jnp.asarray(tokens, jnp.int32))
        sd = to_official(model_weights(model), cfg)
        ref_logits = reference_lm(ref, tt, sd, tokens, cfg)
        layout = "scanned" if cfg.scan_layers else "unrolled"
        rows.append(Row("M", f"LM {name} (2 layers, {layout}) via convert.to_official: logits",
                        {"y": rel(ours, tnp(ref_logits))}))
    return rows


# ----------------------------------------------------------------------------- main


def format_table(rows: list[Row], tol: float) -> str:
    lines = ["| sec | comparison | " + " | ".join(COLUMNS) + " | ok |",
             "|---|---|" + "---|" * len(COLUMNS) + "---|"]
    for r in rows:
        cells = [f"{r.errs[c]:.1e}" if c in r.errs else "—" for c in COLUMNS]
        worst = max(r.errs.values())
        ok = ("info" if not r.counted else "yes" if worst <= tol else "**NO**")
        lines.append(f"| {r.section} | {r.name} | " + " | ".join(cells) + f" | {ok} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mamba-repo", required=True, type=Path,
                    help="checkout of github.com/state-spaces/mamba (with Mamba-3)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ref-dtype", choices=("float64", "float32"), default="float64",
                    help="dtype the reference functions run in (ours always runs in float32)")
    ap.add_argument("--tol", type=float, default=1e-4)
    ap.add_argument("--sections", default="ABPCDM", help="subset of A, B, P, C, D, M to run")
    args = ap.parse_args(argv)

    import torch

    torch.manual_seed(args.seed)
    ref = Reference(args.mamba_repo.resolve())
    tt = Torch(getattr(torch, args.ref_dtype))
    print(f"reference: {args.mamba_repo} @ {ref.commit()}; torch {torch.__version__}, "
          f"jax {jax.__version__} ({jax.default_backend()}); reference dtype {args.ref_dtype}, "
          f"ours float32; seed {args.seed}; tol {args.tol:g}", flush=True)
    rows: list[Row] = []
    with torch.no_grad():
        if "A" in args.sections:
            for rf in (0.5, 1.0):
                rows += section_siso(ref, tt, args.seed, rf)
        if "B" in args.sections:
            for rf in (0.5, 1.0):
                rows += section_mimo(ref, tt, args.seed, rf)
        if "P" in args.sections:
            rows += section_packed(ref, tt, args.seed)
        if "C" in args.sections:
            rows += section_rotary(ref, tt, args.seed)
        if "D" in args.sections:
            rows += section_layer(ref, tt, args.seed)
        if "M" in args.sections:
            rows += section_model(ref, tt, args.seed)
    print(format_table(rows, args.tol))
    counted = [r for r in rows if r.counted]
    worst = max(counted, key=lambda r: max(r.errs.values()))
    bad = [r for r in counted if max(r.errs.values()) > args.tol]
    print(f"\n{len(counted)} counted comparisons; worst {max(worst.errs.values()):.2e} "
          f"({worst.name}); {len(bad)} above tol {args.tol:g}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
