"""Whole-model checkpoint conversion (mamba3_jax/convert.py, docs/weights.md): our weights <->
official `MambaLMHeadModel` state dicts, files, the command line, and (when `mamba_ssm` imports)
the official module's logits on converted weights."""

import json
import os
import pathlib
import sys
import zlib

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mamba3_jax import convert
from mamba3_jax.config import ModelConfig
from mamba3_jax.convert import (
    ConversionError,
    build_model,
    config_from_official,
    from_official,
    mimo_channel_permutation,
    model_weights,
    official_attn_cfg,
    official_config,
    to_official,
)
from mamba3_jax.model import Mamba3LM

BASE = dict(vocab_size=257, d_model=32, n_layer=2, d_state=16, headdim=8, ngroups=2,
            a_activation="heavy_tail", d_mlp=128, dt_min=0.01, dt_max=0.3)
CASES = {
    "siso": dict(),
    "mimo": dict(mimo_rank=2, is_outproj_norm=True, rope_fraction=1.0),
    "mamba2": dict(mixer="mamba2", d_conv=4),
    "untied": dict(tie_embeddings=False),
    "transformer": dict(mixer="attention", attn_kv_heads=2),
    "hybrid": dict(layer_pattern="MA", attn_rope=False),
}


def noise(name, shape):
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    return 0.3 * rng.standard_normal(shape).astype(np.float32)


def make(case, scan_layers=False, seed=0, **extra):
    """A model whose every parameter is perturbed, the constant-initialised ones included (so a
    swapped or mis-permuted entry shows up), by noise that depends on the parameter's name and
    layer only: the stacked and the unrolled model get equal weights."""
    cfg = ModelConfig(**{**BASE, **CASES[case], **extra, "scan_layers": scan_layers})
    flat = model_weights(Mamba3LM(cfg, rngs=nnx.Rngs(seed)))
    for path, a in flat.items():
        if path[0] == "blocks":
            rest, g = path[1:], cfg.scan_group
            if g > 1:  # hybrid: blocks.<position>.<name>, layer = repeat * g + position
                layers, rest = [r * g + rest[0] for r in range(len(a))], rest[1:]
            else:
                layers = range(len(a))
            name = ".".join(map(str, rest))
            flat[path] = a + np.stack([noise(f"{i}.{name}", a.shape[1:]) for i in layers])
        elif path[0] == "layers":
            flat[path] = a + noise(f"{path[1]}." + ".".join(map(str, path[2:])), a.shape)
        else:
            flat[path] = a + noise(".".join(map(str, path)), a.shape)
    return cfg, build_model(cfg, flat)


TOKENS = jnp.asarray(np.random.default_rng(1).integers(0, 257, (2, 12)), jnp.int32)
_forward = nnx.jit(lambda m, t: m(t))  # eager op-by-op is 10x slower on CPU


def logits(model):
    return np.asarray(_forward(model, TOKENS))


def official_shapes(oc: dict) -> dict:
    """Each key's shape as the official modules define it (mamba_ssm/models/mixer_seq_simple.py,
    modules/{mamba3,mamba2,mlp,block}.py), written out independently of convert.py."""
    d, f, V, ssm = oc["d_model"], oc["d_intermediate"], oc["vocab_size"], oc["ssm_cfg"]
    if not ssm:  # every layer attention
        ssm = {"layer": "none", "d_state": 0, "ngroups": 1, "headdim": 1, "expand": 1}
    N, G, P = ssm["d_state"], ssm["ngroups"], ssm["headdim"]
    E = ssm["expand"] * d
    H = E // P
    out = {"backbone.embedding.weight": (V, d), "backbone.norm_f.weight": (d,),
           "lm_head.weight": (V, d)}
    layer = {"norm.weight": (d,), "norm2.weight": (d,), "mlp.fc1.weight": (2 * f, d),
             "mlp.fc2.weight": (d, f), "mixer.out_proj.weight": (d, E),
             "mixer.dt_bias": (H,), "mixer.D": (H,)}
    if ssm["layer"] == "none":
        pass
    elif ssm["layer"] == "Mamba3":
        R = ssm["mimo_rank"] if ssm["is_mimo"] else 1
        S = int(N * ssm["rope_fraction"]) // 2
        layer.update({"mixer.in_proj.weight": (2 * E + 2 * N * G * R + 3 * H + S, d),
                      "mixer.B_norm.weight": (N,), "mixer.C_norm.weight": (N,),
                      "mixer.B_bias": (H, R, N), "mixer.C_bias": (H, R, N)})
        if ssm["is_mimo"]:
            layer.update({f"mixer.mimo_{n}": (H, R, P) for n in "xzo"})
        if ssm["is_outproj_norm"]:
            layer["mixer.norm.weight"] = (E,)
    else:
        conv = E + 2 * G * N
        layer.update({"mixer.in_proj.weight": (2 * E + 2 * G * N + H, d),
                      "mixer.conv1d.weight": (conv, 1, ssm["d_conv"]),
                      "mixer.conv1d.bias": (conv,), "mixer.A_log": (H,),
                      "mixer.norm.weight": (E,)})
    attn = oc["attn_cfg"]
    for i in range(oc["n_layer"]):
        this = layer
        if i in oc["attn_layer_idx"]:  # modules/mha.py: fused q/k/v in_proj, no biases here
            N, K, Da = attn["num_heads"], attn["num_heads_kv"], attn["head_dim"]
            this = {k: v for k, v in layer.items() if not k.startswith("mixer.")}
            this.update({"mixer.in_proj.weight": ((N + 2 * K) * Da, d),
                         "mixer.out_proj.weight": (d, N * Da)})
        out.update({f"backbone.layers.{i}.{k}": v for k, v in this.items()})
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_keys_and_shapes_are_the_official_ones(case):
    cfg, model = make(case)
    oc = official_config(cfg)
    sd = to_official(model_weights(model), cfg)
    assert {k: v.shape for k, v in sd.items()} == official_shapes(oc)


@pytest.mark.parametrize("case", list(CASES) + ["hybrid4"])
def test_round_trip_both_layouts(case):
    """ours -> official -> ours is exact, from and to both layer layouts; the stacked and the
    unrolled model (equal seeds give equal weights) export to the same state dict. hybrid4: a
    hybrid pattern repeated twice (layers stacked per pattern position)."""
    extra = {}
    if case == "hybrid4":
        case, extra = "hybrid", dict(n_layer=4)
    cfg_u, unrolled = make(case, scan_layers=False, **extra)
    cfg_s, stacked = make(case, scan_layers=True, **extra)
    sd_u = to_official(model_weights(unrolled), cfg_u)
    sd_s = to_official(model_weights(stacked), cfg_s)
    assert sd_u.keys() == sd_s.keys()
    for k in sd_u:
        np.testing.assert_array_equal(sd_u[k], sd_s[k], err_msg=k)
    for target, model in ((cfg_u, unrolled), (cfg_s, stacked)):  # either source, same dict
        back = from_official(sd_u, target)
        want = model_weights(model)
        assert back.keys() == want.keys()
        for k in want:
            np.testing.assert_array_equal(back[k], want[k], err_msg=str(k))


@pytest.mark.parametrize("case", ["siso", "mimo", "mamba2", "transformer", "hybrid"])
def test_config_round_trip_gives_the_same_logits(case):
    """Export the weights and the config, rebuild from the official side alone: same logits."""
    cfg, model = make(case)
    oc = json.loads(json.dumps(official_config(cfg)))  # as it would come from config.json
    sd = to_official(model_weights(model), cfg)
    cfg2 = config_from_official(oc, vocab_size=sd["backbone.embedding.weight"].shape[0])
    assert cfg2.num_params() == cfg.num_params()
    np.testing.assert_allclose(logits(build_model(cfg2, from_official(sd, cfg2))),
                               logits(model), rtol=1e-6, atol=1e-6)


def test_imported_hybrid_pattern_is_its_period():
    """attn_layer_idx [5, 11] of 12 layers comes back as layer_pattern "MMMMMA" (scanned over
    its 2 repeats, as exported), not the 12-letter string; an irregular one stays whole."""
    cfg, _ = make("hybrid", layer_pattern="MMMMMA", n_layer=12)
    oc = json.loads(json.dumps(official_config(cfg)))
    assert oc["attn_layer_idx"] == [5, 11]
    back = config_from_official(oc, vocab_size=cfg.vocab_size, scan_layers=True)
    assert back.layer_pattern == "MMMMMA" and back.stacked_location(11) == (("blocks", 5), 1)
    assert convert.shortest_period("MMAMMA") == "MMA"
    assert convert.shortest_period("MAAMMM") == "MAAMMM"
    assert convert.shortest_period("AAAA") == "A"


def test_mimo_state_channels_are_permuted():
    """Official MIMO checkpoints pair channels (i, i + N/2): each B/C quantity's N axis is
    reordered with docs/weights.md's permutation, everything else is not."""
    cfg, model = make("mimo")
    perm = mimo_channel_permutation(cfg.d_state, cfg.num_rope_angles)
    assert not np.array_equal(perm, np.arange(cfg.d_state))
    ours = model_weights(model)
    sd = to_official(ours, cfg)
    mixer = ("layers", 1, "mixer")
    off = "backbone.layers.1.mixer."
    np.testing.assert_array_equal(sd[off + "B_norm.weight"][perm], ours[mixer + ("B_norm",)])
    np.testing.assert_array_equal(sd[off + "C_bias"][..., perm], ours[mixer + ("C_bias",)])
    E, W, N = cfg.d_inner, cfg.bc_width, cfg.d_state
    w_off = sd[off + "in_proj.weight"]
    w_our = ours[mixer + ("in_proj", "kernel")].T
    for start in (2 * E, 2 * E + W):  # B rows, C rows: (rank, group, state)
        blk_off = w_off[start:start + W].reshape(-1, N, cfg.d_model)
        blk_our = w_our[start:start + W].reshape(-1, N, cfg.d_model)
        np.testing.assert_array_equal(blk_off[:, perm], blk_our)
    rest = np.r_[0:2 * E, 2 * E + 2 * W:w_off.shape[0]]
    np.testing.assert_array_equal(w_off[rest], w_our[rest])
    np.testing.assert_array_equal(sd[off + "mimo_x"], ours[mixer + ("mimo_x",)])


def test_mamba2_conv_layout():
    """torch Conv1d weight (ch, 1, K) with the current token on tap K-1, as ours (K, ch)."""
    cfg, model = make("mamba2")
    ours = model_weights(model)[("layers", 0, "mixer", "conv_weight")]
    sd = to_official(model_weights(model), cfg)
    np.testing.assert_array_equal(sd["backbone.layers.0.mixer.conv1d.weight"][:, 0, :], ours.T)


def test_unrepresentable_models_are_refused():
    cfg, _ = make("siso")
    with pytest.raises(ConversionError, match="heavy_tail"):
        official_config(cfg.replace(a_activation="softplus"))
    official_config(cfg.replace(a_activation="softplus"), force=True)
    for bad, msg in ((dict(rotation="fixed"), "rotation"), (dict(d_conv=4), "d_conv"),
                     (dict(discretization="euler"), "discretization"),
                     (dict(d_mlp=100, mlp_multiple_of=4), "multiple of 128")):
        with pytest.raises(ConversionError, match=msg):
            official_config(cfg.replace(**bad))
    oc = official_config(cfg)
    attn = official_attn_cfg(cfg.replace(mixer="attention"))
    for bad, msg in ((dict(attn_layer_idx=[1], attn_cfg={**attn, "causal": False}), "causal"),
                     (dict(attn_layer_idx=[1], attn_cfg={**attn, "rotary_emb_dim": 4}),
                      "rotary_emb_dim"),
                     (dict(attn_layer_idx=[1], attn_cfg={**attn, "rotary_emb_interleaved": False}),
                      "interleaved"),
                     (dict(attn_layer_idx=[1], attn_cfg={**attn, "head_dim": 16}), "head_dim"),
                     (dict(d_intermediate=0), "MLP"),
                     (dict(rms_norm=False), "LayerNorm"),
                     (dict(ssm_cfg={"layer": "Mamba1"}), "Mamba1"),
                     (dict(ssm_cfg={**oc["ssm_cfg"], "foo": 1}), "foo")):
        with pytest.raises(ConversionError, match=msg):
            config_from_official({**oc, **bad})


def test_bad_state_dicts_are_refused():
    cfg, model = make("siso")
    sd = to_official(model_weights(model), cfg)
    with pytest.raises(ConversionError, match="lacks 'backbone.layers.1.mixer.D'"):
        from_official({k: v for k, v in sd.items() if k != "backbone.layers.1.mixer.D"}, cfg)
    with pytest.raises(ConversionError, match="no counterpart"):
        from_official({**sd, "backbone.layers.0.mixer.extra": np.zeros(1)}, cfg)
    with pytest.raises(ConversionError, match="shape"):
        build_model(cfg.replace(d_state=8), from_official(sd, cfg))
    with pytest.raises(ConversionError, match="lm_head.weight differs"):
        from_official({**sd, "lm_head.weight": sd["lm_head.weight"] + 1}, cfg)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_files_round_trip(tmp_path, suffix):
    if suffix == ".pt":
        pytest.importorskip("torch")
    pytest.importorskip("safetensors")
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((5, 3)).astype(np.float32)
    sd = {"backbone.embedding.weight": emb, "lm_head.weight": emb,
          "x": np.asarray(jnp.asarray(rng.standard_normal((2, 3)), jnp.bfloat16))}
    path = str(tmp_path / f"m{suffix}")
    convert.write_state_dict(sd, path)
    back = convert.read_state_dict(path)
    assert back.keys() == sd.keys()
    for k in sd:
        assert back[k].dtype == sd[k].dtype, k
        np.testing.assert_array_equal(back[k].astype(np.float32), sd[k].astype(np.float32))


def test_cli_round_trip(tmp_path, capsys):
    """run -> .safetensors -> run (stacked) -> .bin: load_model gives the same logits."""
    pytest.importorskip("safetensors")
    from mamba3_jax.load import load_model

    cfg, model = make("mimo")
    convert.write_run(str(tmp_path / "a"), cfg, model_weights(model))
    st = str(tmp_path / "out" / "model.safetensors")
    assert convert.main(["--from", str(tmp_path / "a"), "--to", st]) == 0
    with open(tmp_path / "out" / "config.json") as f:
        assert json.load(f)["ssm_cfg"]["is_mimo"] is True
    assert convert.main(["--from", st, "--to", str(tmp_path / "b"), "--scan_layers"]) == 0
    run = load_model(str(tmp_path / "b"))
    assert run.model.cfg.scan_layers
    np.testing.assert_allclose(logits(run.model), logits(model), rtol=1e-5, atol=1e-5)
    if os.environ.get("SKIP_TORCH") is None:
        pytest.importorskip("torch")
        pt = str(tmp_path / "pt" / "model.bin")
        assert convert.main(["--from", str(tmp_path / "b"), "--to", pt]) == 0
        a = convert.read_state_dict(st)
        b = convert.read_state_dict(pt)
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.mark.parametrize("argv, msg", [
    (["--from", "x.safetensors", "--to", "y.bin"], "one of --from / --to must be a run"),
    (["--from", "nowhere", "--to", "y.safetensors"], "does not exist"),
    (["--to", "y.safetensors"], "--from"),
])
def test_cli_errors(argv, msg, capsys):
    with pytest.raises(SystemExit) as e:
        convert.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and msg in err and "\n" not in err


def test_cli_refuses_softplus_without_force(tmp_path, capsys):
    cfg, model = make("siso")
    cfg = cfg.replace(a_activation="softplus")
    convert.write_run(str(tmp_path / "a"), cfg, model_weights(model))
    with pytest.raises(SystemExit):
        convert.main(["--from", str(tmp_path / "a"), "--to", str(tmp_path / "m.safetensors")])
    assert "heavy_tail" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "m.safetensors")


def test_cli_softplus_round_trip_with_force_and_a_activation(tmp_path, capsys):
    """A softplus model exported with --force comes back unchanged only with --a_activation
    softplus (the official config cannot say softplus; the default import is heavy_tail, what
    the official layer computes); the export says so."""
    pytest.importorskip("safetensors")
    from mamba3_jax.load import load_model

    cfg, model = make("siso")
    cfg = cfg.replace(a_activation="softplus")
    model = convert.build_model(cfg, model_weights(model))
    convert.write_run(str(tmp_path / "a"), cfg, model_weights(model))
    st = str(tmp_path / "m.safetensors")
    assert convert.main(["--from", str(tmp_path / "a"), "--to", st, "--force"]) == 0
    assert "--a_activation softplus" in capsys.readouterr().out
    assert convert.main(["--from", st, "--to", str(tmp_path / "b"), "--a_activation",
                         "softplus"]) == 0
    back = load_model(str(tmp_path / "b")).model
    assert back.cfg.a_activation == "softplus"
    np.testing.assert_array_equal(logits(back), logits(model))
    assert convert.main(["--from", st, "--to", str(tmp_path / "c")]) == 0
    assert load_model(str(tmp_path / "c")).model.cfg.a_activation == "heavy_tail"
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:  # an export keeps the run's own activation
        convert.main(["--from", str(tmp_path / "a"), "--to", str(tmp_path / "n.safetensors"),
                      "--a_activation", "softplus"])
    assert e.value.code == 2 and "applies to imports" in capsys.readouterr().err


@pytest.mark.parametrize("case", ["siso", "mamba2"])
def test_logits_match_the_official_module(case):
    """Only where `mamba_ssm` imports (its Triton kernels need a GPU build): our logits vs
    MambaLMHeadModel's on the converted weights, on CPU."""
    torch = pytest.importorskip("torch")
    mixer_seq = pytest.importorskip("mamba_ssm.models.mixer_seq_simple")
    from mamba_ssm.models.config_mamba import MambaConfig

    cfg, model = make(case)
    oc = official_config(cfg)
    ref = mixer_seq.MambaLMHeadModel(MambaConfig(**{**oc, "fused_add_norm": False}))
    ref.load_state_dict({k: torch.from_numpy(v.copy())
                         for k, v in to_official(model_weights(model), cfg).items()})
    with torch.no_grad():
        ref_logits = ref(torch.from_numpy(np.asarray(TOKENS)).long()).logits.numpy()
    np.testing.assert_allclose(ref_logits, logits(model), rtol=1e-4, atol=1e-4)


def test_logits_match_the_official_math():
    """Where a state-spaces/mamba checkout is named by MAMBA_REPO (and torch, einops import):
    experiments/compare_official.py section M runs `MambaLMHeadModel`'s glue in torch on
    `to_official` state dicts, each mixer by the official reference functions (MIMO in the
    kernels' channel pairing), for SISO, MIMO, Mamba-2, Transformer++ and a hybrid. About 55 s,
    so opt-in."""
    repo = os.environ.get("MAMBA_REPO")
    if not repo:
        pytest.skip("set MAMBA_REPO to a state-spaces/mamba checkout")
    torch = pytest.importorskip("torch")
    pytest.importorskip("einops")
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "experiments"))
    import compare_official as co

    with torch.no_grad():
        rows = co.section_model(co.Reference(pathlib.Path(repo)), co.Torch(torch.float64), 0)
    assert len(rows) == 7
    for row in rows:
        assert row.errs["y"] < 1e-4, (row.name, row.errs)
