"""Config files, command-line overrides and validation errors."""

import json

import pytest

from mamba3_jax.training.config import (
    ConfigError,
    base_config,
    diff_configs,
    model_config,
    validate,
)
from tests.training.common import TINY_CONFIG, cli, tiny_config


def test_base_and_shipped_configs_validate():
    validate(base_config())
    validate(tiny_config())


def _errors(c) -> str:
    with pytest.raises(ConfigError) as e:
        validate(c)
    return str(e.value)


def test_bad_values_are_all_reported():
    c = tiny_config()
    c.model.d_state = 7  # odd
    c.model.headdim = 48  # expand * d_model = 64 not divisible
    c.optim.schedule = "cosinus"
    c.optim.b2 = 1.5
    c.data.batch_size = 6
    c.train.grad_accum = 4  # 6 % 4
    c.train.steps = 0
    c.train.xla_triton_gemm = "cublas"
    msg = _errors(c)
    for needle in ("d_state must be even", "must be divisible by headdim",
                   "optim.schedule must be one of", "optim.b2 must be in [0, 1)",
                   "divisible by train.grad_accum", "train.steps must be a positive integer",
                   "train.xla_triton_gemm must be one of ('auto', 'on', 'off'), got 'cublas'"):
        assert needle in msg, (needle, msg)


def test_unknown_keys_are_rejected_with_valid_keys():
    c = tiny_config()
    c.unlock()
    c.model.d_sate = 64
    c.optimizer = {"lr": 1.0}
    msg = _errors(c)
    assert "unknown key 'model.d_sate'" in msg and "d_state" in msg
    assert "unknown key 'optimizer'" in msg


def test_warmup_longer_than_schedule():
    c = tiny_config()
    c.optim.warmup_steps = 100
    assert "exceeds the schedule length" in _errors(c)


def test_vocab_from_tokenizer_and_padding():
    c = tiny_config()
    c.model.vocab_size = 0
    c.data.vocab_multiple = 128
    assert model_config(c, 257).vocab_size == 384
    c.model.vocab_size = 100
    with pytest.raises(ConfigError, match="smaller than the tokenizer"):
        model_config(c, 257)


def test_diff_configs_ignores_resume_safe_keys():
    a, b = tiny_config().to_dict(), tiny_config()
    b.train.steps = 1000
    b.mesh.fsdp = 4
    b.model.n_layer = 3
    b.data.train_source = {"kind": "books", "split": "train"}
    from mamba3_jax.training.config import RESUME_SAFE_PREFIXES
    diff = diff_configs(a, b.to_dict(), ignore=RESUME_SAFE_PREFIXES)
    keys = [k for k, _, _ in diff]
    assert keys == ["data.train_source", "model.n_layer"]


def test_diff_configs_a_field_added_since_the_run_counts_as_its_default():
    old, cur = tiny_config().to_dict(), tiny_config()
    default = old["model"].pop("mixer")  # a run saved before the field existed
    assert diff_configs(old, cur.to_dict()) == []
    cur.model.mixer = "attention" if default != "attention" else "mamba3"
    assert [k for k, _, _ in diff_configs(old, cur.to_dict())] == ["model.mixer"]


@pytest.mark.parametrize("value", [False, True])
def test_a_saved_config_with_part_matmuls_still_loads(value):
    """model.part_matmuls, a removed field (it only split the same matmuls), in the config of a
    run saved before: dropped when the model config is read back, no difference on resume."""
    from mamba3_jax.training.config import RESUME_SAFE_PREFIXES, config_json

    saved = json.loads(config_json(tiny_config()))  # as a checkpoint stores it
    saved["model"]["part_matmuls"] = value
    assert model_config(saved, 257) == model_config(tiny_config(), 257)
    assert diff_configs(saved, tiny_config().to_dict(), ignore=RESUME_SAFE_PREFIXES) == []


def test_cli_overrides_and_print_config():
    r = cli(["--config", TINY_CONFIG, "--print_config", "--config.model.d_state=64",
             "--config.optim.schedule=wsd", "--config.model.chunk_size=8",
             "--config.data.train_source.split=valid"])
    assert r.returncode == 0, r.stderr
    cfg = json.loads(r.stdout)
    assert cfg["model"]["d_state"] == 64
    assert cfg["model"]["chunk_size"] == 8
    assert cfg["optim"]["schedule"] == "wsd"
    assert cfg["data"]["train_source"] == {"kind": "tinyshakespeare", "split": "valid"}


def test_cli_rejects_unknown_key_and_bad_value():
    r = cli(["--config", TINY_CONFIG, "--print_config", "--config.model.d_sate=64"])
    assert r.returncode == 2
    assert "unknown config key 'model.d_sate'" in r.stderr and "d_state" in r.stderr
    r = cli(["--config", TINY_CONFIG, "--print_config", "--config.model.d_state=63",
             "--config.optim.peak_lr=-1"])
    assert r.returncode == 2
    assert "d_state must be even" in r.stderr and "optim.peak_lr must be > 0" in r.stderr


def test_cli_batch_not_divisible_by_devices(tmp_path):
    r = cli(["--config", TINY_CONFIG, "--workdir", str(tmp_path), "--config.data.batch_size=6",
             "--config.train.grad_accum=2", "--config.mesh.data=2"], env_extra={
                 # two forced CPU devices, also on a GPU machine (which would use its GPUs)
                 "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"})
    assert r.returncode == 2, r.stdout + r.stderr
    assert "microbatch data.batch_size / train.grad_accum = 6 / 2 = 3" in r.stderr
    assert "must be divisible by the 2 devices" in r.stderr


@pytest.mark.parametrize("arg", ["180m", "440m_mimo", "880m", "1.5b_mimo", "1.5b"])
def test_paper_configs(arg):
    import importlib.util

    spec = importlib.util.spec_from_file_location("paper_cfg", "configs/paper.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config(arg)
    validate(c)
    mc = model_config(c, 100277)
    size, variant = mod.parse_arg(arg)
    n_layer, d_model, mlp_siso, mlp_mimo, lr = mod.SIZES[size]
    assert (mc.n_layer, mc.d_model, mc.d_state, mc.headdim, mc.expand) == (
        n_layer, d_model, 128, 64, 2)
    assert mc.mimo_rank == (4 if variant == "mimo" else 1)
    assert mc.resolved_d_mlp == (mlp_mimo if variant == "mimo" else mlp_siso)
    assert c.optim.peak_lr == lr and c.data.seq_len == 2048
    assert c.data.batch_size * c.data.seq_len == 524288
    assert mc.dtype == "bfloat16" and mc.param_dtype == "float32"
    # SISO runs unrolled at every size (faster step; 1.5B compiles in 56 s) and keeps every
    # activation at 24 layers; the other variants scan over 24 layers
    assert mc.scan_layers == (n_layer > 12 and variant != "siso")
    assert (c.train.remat == "none") == (variant == "siso" and n_layer > 12)
    with pytest.raises(ValueError, match="unknown paper config"):
        mod.get_config("2b")


def test_remat_and_profile_steps_are_checked():
    from mamba3_jax.training.config import profile_range

    c = tiny_config()
    c.train.remat = "names:in_proj,bogus"
    c.train.profile_steps = "5:5"
    msg = _errors(c)
    assert "train.remat" in msg and "train.profile_steps" in msg, msg
    c.train.remat, c.train.profile_steps = "dots", "3:5"
    validate(c)
    assert profile_range("3:5") == (3, 5) and profile_range("") is None
