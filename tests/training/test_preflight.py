"""Bad inputs are found before training starts: one line naming the problem, exit code 2."""

import lzma
import shutil

import pytest

from mamba3_jax.training import preflight
from mamba3_jax.training.config import ConfigError, validate
from tests.training.common import TINY_CONFIG, cli, tiny_config


def _invalid(c) -> str:
    with pytest.raises(ConfigError) as e:
        validate(c)
    return str(e.value)


@pytest.mark.parametrize("key,value,needle", [
    ("data.tokenizer", "gtp2", "data.tokenizer='gtp2' is not a tokenizer; valid: byte, gpt2"),
    ("data.tokenizer", "/nope/tokenizer.json", "data.tokenizer: file not found"),
    ("data.train_source", {"kind": "bookz"}, "data.train_source.kind='bookz' is not a source "
     "kind; valid: books, text"),
    ("data.eval_source", {"kind": "books", "split": "validation"},
     "data.eval_source.split='validation' is not a books split; valid: train, valid, test"),
    ("data.train_source", {"kind": "tinyshakespeare", "split": "dev"},
     "data.train_source.split='dev' is not a tinyshakespeare split"),
    ("data.train_source", {"kind": "text"}, "missing a required argument: 'paths'"),
    ("data.train_source", {"kind": "books", "max_doc": 3}, "unexpected keyword argument "
     "'max_doc'; options: split, data_dir, max_docs"),
    ("model.chunk_size", 64, "model.chunk_size=64 exceeds data.seq_len=32"),
])
def test_config_only_problems_are_found_by_validate(key, value, needle):
    c = tiny_config()
    sec, name = key.split(".")
    c[sec][name] = value
    msg = _invalid(c)
    assert needle in msg, msg
    assert msg.startswith("invalid config: ") and "\n" not in msg  # one problem, one line


def test_eval_source_is_not_checked_without_eval():
    c = tiny_config()
    c.data.eval_source = {"kind": "bookz"}
    c.train.eval_steps = 0
    validate(c)


def test_file_problems_name_the_file(tmp_path):
    bad_utf8 = tmp_path / "latin1.txt"
    bad_utf8.write_bytes("caf\xe9 au lait".encode("latin-1"))
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    jsonl = tmp_path / "x.jsonl"
    jsonl.write_text('{"text": "ok"}\n{"txt": "no text key"}\n')
    cases = [
        ({"kind": "text", "paths": [str(tmp_path / "missing.txt")]}, "not found"),
        ({"kind": "text", "paths": [str(bad_utf8)]}, f"'{bad_utf8}' is not utf-8 text: byte 3"),
        ({"kind": "text", "paths": [str(empty)]}, f"has no documents (empty files: {empty})"),
        ({"kind": "jsonl", "paths": [str(jsonl)]}, f"{jsonl} record 1: no text field 'text'"),
    ]
    for spec, needle in cases:
        with pytest.raises(ConfigError) as e:
            preflight.load_source("train_source", spec)
        msg = str(e.value)
        assert needle in msg and msg.startswith("data.train_source {") and "\n" not in msg, msg


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_corrupt_xz_names_the_file(tmp_path, damage):
    from mamba3_jax.data.paths import default_data_dir

    books = tmp_path / "books"
    books.mkdir()
    shutil.copy(default_data_dir() / "books" / "manifest.tsv", books)
    data = bytearray(lzma.compress(b"x" * 100000))
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data[len(data) // 2] ^= 0x01
    (books / "valid.txt.xz").write_bytes(bytes(data))
    with pytest.raises(ConfigError, match=r"valid\.txt\.xz' is not a valid \.xz file"):
        preflight.load_source("eval_source", {"kind": "books", "split": "valid",
                                              "data_dir": str(tmp_path), "cache_dir": False})


def test_backend_without_kernel_on_this_platform():
    import jax

    c = tiny_config()
    c.model.scan_backend = "pallas"
    if jax.default_backend() == "cpu":
        with pytest.raises(ConfigError, match="model.scan_backend='pallas': .*no kernel for "
                                              "platform 'cpu'"):
            preflight.check_backend(c)
    c.model.scan_backend = "chunked"
    preflight.check_backend(c)


def test_gpu_config_on_cpu_warns():
    from mamba3_jax.config import ModelConfig

    small = ModelConfig(vocab_size=257, d_model=64, n_layer=1, d_state=16, headdim=16)
    assert preflight.gpu_warning("cpu", small, 4096, 1e6) is None
    assert preflight.gpu_warning("gpu", small, 1 << 20, 1e9) is None
    bf16 = ModelConfig(vocab_size=257, d_model=64, n_layer=1, d_state=16, headdim=16,
                       dtype="bfloat16")
    assert "bfloat16 compute" in preflight.gpu_warning("cpu", bf16, 4096, 1e6)
    big = preflight.gpu_warning("cpu", small, 65536, 3e8)
    assert "19.7 TFLOP per step" in big and "jax[cuda]" in big


def test_deterministic_flag_helpers(monkeypatch):
    assert preflight.with_deterministic_flag("") == "--xla_gpu_deterministic_ops=true"
    assert preflight.with_deterministic_flag("--a=1") == "--a=1 --xla_gpu_deterministic_ops=true"
    # an explicit choice either way is kept
    assert preflight.with_deterministic_flag("--xla_gpu_deterministic_ops=false") == \
        "--xla_gpu_deterministic_ops=false"
    monkeypatch.setenv("XLA_FLAGS", "")
    assert preflight.determinism_warning(True, "cpu") is None
    assert preflight.determinism_warning(False, "gpu") is None
    assert "lacks --xla_gpu_deterministic_ops" in preflight.determinism_warning(True, "gpu")
    monkeypatch.setenv("XLA_FLAGS", "--xla_gpu_deterministic_ops=true")
    assert preflight.determinism_warning(True, "gpu") is None


def test_cli_bad_inputs_exit_2_with_one_line(tmp_path):
    """Both kinds in one process each: a config-only problem is caught by --print_config, a file
    problem before any training (no metrics written)."""
    r = cli(["--config", TINY_CONFIG, "--print_config", "--config.data.tokenizer=gtp2"])
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith("error: invalid config: data.tokenizer='gtp2'")
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xff\xfe\x00 not utf-8")
    r = cli(["--config", f"{TINY_CONFIG}:text={bad}", "--workdir", str(tmp_path / "w")])
    assert r.returncode == 2, r.stdout + r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: data.train_source {") and f"'{bad}' is not utf-8" in last
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "w" / "metrics.jsonl").exists()


def test_gpu_xla_flags_follow_the_train_section():
    """A GPU run gets the determinism flag (train.deterministic) and XLA's Triton GEMM fusions
    off (train.xla_triton_gemm: "off", or "auto" with unrolled layers); what the caller set
    either way is kept."""
    from mamba3_jax.training.config import base_config

    c = base_config()
    assert c.train.deterministic and c.train.xla_triton_gemm == "auto"  # the defaults
    c.model.scan_layers = False
    assert preflight.gpu_xla_flags("", c) == (
        "--xla_gpu_deterministic_ops=true --xla_gpu_enable_triton_gemm=false")
    c.model.scan_layers = True  # auto: XLA's default under the layer scan
    assert preflight.gpu_xla_flags("", c) == "--xla_gpu_deterministic_ops=true"
    c.train.deterministic, c.train.xla_triton_gemm = False, "on"
    c.model.scan_layers = False
    assert preflight.gpu_xla_flags("--a=1", c) == "--a=1"
    c.train.xla_triton_gemm = "off"
    assert preflight.gpu_xla_flags("--a=1", c) == "--a=1 --xla_gpu_enable_triton_gemm=false"
    assert preflight.gpu_xla_flags("--xla_gpu_enable_triton_gemm=true", c) == \
        "--xla_gpu_enable_triton_gemm=true"
