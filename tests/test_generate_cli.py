"""Generation from a trained run: load_model reads the checkpoint's weights, config and
tokenizer; the command line streams text, validates its arguments with one-line errors."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from mamba3_jax import generate_cli
from mamba3_jax.generate import generate
from mamba3_jax.load import load_model
from mamba3_jax.training.trainer import train
from tests.training.common import REPO, tiny_config


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A tiny byte-level run trained for 2 steps, checkpointed at steps 1 and 2."""
    c = tiny_config()
    c.train.steps, c.train.eval_steps, c.train.checkpoint_every = 2, 0, 1
    c.model.scan_backend = "reference"  # the quickest to compile on the CPU
    workdir = str(tmp_path_factory.mktemp("gen_run"))
    train(c, workdir)
    return workdir


@pytest.mark.filterwarnings("ignore:Sharding info not provided")  # the raw restore below
def test_load_model_restores_the_checkpoint_weights(run_dir):
    run = load_model(run_dir)
    assert run.step == 2 and run.tokenizer.vocab_size == 257
    assert run.config["data"]["tokenizer"] == "byte"
    raw = ocp.PyTreeCheckpointer().restore(os.path.join(run_dir, "checkpoints", "2", "state"))
    loaded = nnx.to_pure_dict(nnx.state(run.model, nnx.Param))
    saved, ours = jax.tree.leaves(raw["params"]), jax.tree.leaves(loaded)
    assert len(saved) == len(ours) > 0
    for a, b in zip(saved, ours, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    older = load_model(run_dir, step=1)
    assert older.step == 1
    assert any(not np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(
        ours, jax.tree.leaves(nnx.to_pure_dict(nnx.state(older.model, nnx.Param))), strict=True))


def test_cli_streams_the_same_tokens_as_generate(run_dir, capsys):
    """One prompt: the echoed prompt, then exactly the text of generate()'s tokens for the same
    seed and sampling settings."""
    rc = generate_cli.main(["--workdir", run_dir, "--prompt", "ROMEO:", "--temperature", "0.9",
                            "--top_k", "20", "--top_p", "0.9", "--seed", "3",
                            "--max_new_tokens", "12", "--ignore_eos"])
    assert rc == 0
    run = load_model(run_dir)
    prompt = jnp.asarray([run.tokenizer.encode("ROMEO:")], jnp.int32)
    new = generate(run.model, prompt, jax.random.PRNGKey(3), max_new_tokens=12, temperature=0.9,
                   top_k=20, top_p=0.9)
    want = "ROMEO:" + generate_cli.decode(run.tokenizer, np.asarray(new[0]), None)
    assert capsys.readouterr().out == want + "\n"


def test_cli_batch_of_prompts_in_order(run_dir, capsys, tmp_path):
    """--prompt values then the file's lines, printed in that order; prompts of equal token
    length decode as one batch whose rows match generate() on that batch."""
    f = tmp_path / "prompts.txt"
    f.write_text("To be\nKING:\n")
    rc = generate_cli.main(["--workdir", run_dir, "--prompt", "ab", "--prompt_file", str(f),
                            "--max_new_tokens", "2", "--temperature", "0", "--step", "1",
                            "--ignore_eos"])
    assert rc == 0
    out = capsys.readouterr().out
    blocks = out.split("--- ")[1:]
    assert [b.split("\n", 1)[0] for b in blocks] == ["1 ---", "2 ---", "3 ---"]
    assert blocks[0].split("\n", 1)[1].startswith("ab")
    run = load_model(run_dir, step=1)
    pair = jnp.asarray([run.tokenizer.encode("To be"), run.tokenizer.encode("KING:")], jnp.int32)
    new = np.asarray(generate(run.model, pair, jax.random.PRNGKey(0), max_new_tokens=2))
    for block, p, row in zip(blocks[1:], ["To be", "KING:"], new, strict=True):
        assert block.split("\n", 1)[1] == p + generate_cli.decode(run.tokenizer, row, None) + "\n"


@pytest.mark.parametrize("args, message", [
    (["--temperature", "-0.5"], "temperature must be"),
    (["--temperature", "nan"], "temperature must be"),
    (["--top_k", "0"], "top_k must be"),
    (["--top_k", "300"], "exceeds the vocabulary size 257"),
    (["--top_p", "0"], "top_p must be in (0, 1]"),
    (["--top_p", "1.01"], "top_p must be in (0, 1]"),
    (["--prefill_chunk", "0"], "prefill_chunk must be"),
    (["--max_new_tokens", "0"], "max_new_tokens must be"),
    (["--step", "9"], "no checkpoint at step 9; it has steps 1, 2"),
    (["--prompt", ""], "prompt 2 is empty"),
])
def test_cli_bad_arguments_are_one_line_errors(run_dir, capsys, args, message):
    rc = generate_cli.main(["--workdir", run_dir, "--prompt", "hi", *args])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err


def test_cli_missing_run_and_prompts(tmp_path, capsys):
    assert generate_cli.main(["--workdir", str(tmp_path / "nope"), "--prompt", "x"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert generate_cli.main(["--workdir", str(tmp_path), "--prompt", "x"]) == 2
    assert "has no checkpoint" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "checkpoints")  # reading created nothing
    assert generate_cli.main(["--workdir", str(tmp_path)]) == 2
    assert "at least one prompt" in capsys.readouterr().err


def test_decode_cuts_at_end_of_text_and_skips_unknown_ids():
    from mamba3_jax.data.tokenizers import ByteTokenizer

    tok = ByteTokenizer()
    assert generate_cli.decode(tok, [104, 105, 256, 106], eos_id=256) == "hi"
    assert generate_cli.decode(tok, [104, 300, 105], eos_id=None) == "hi"
    assert generate_cli.stable_prefix("ab\ufffd") == "ab"


def test_module_entry_point(run_dir):
    """`python -m mamba3_jax.generate` is the command line (a bad argument: exit 2, one line)."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    p = subprocess.run([sys.executable, "-m", "mamba3_jax.generate", "--workdir", run_dir,
                        "--prompt", "x", "--temperature", "-1"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and p.stderr.startswith("error: temperature"), p.stderr


def test_cli_kv_cache_too_small_is_a_one_line_error(tmp_path, capsys):
    """Attention layers: a prompt + max_new_tokens beyond max_seq_len is refused as one
    `error:` line (exit 2) by the command line, not a traceback; exactly max_seq_len runs."""
    from mamba3_jax.config import ModelConfig
    from mamba3_jax.convert import model_weights, write_run
    from mamba3_jax.model import Mamba3LM

    cfg = ModelConfig(vocab_size=264, d_model=32, n_layer=1, headdim=16, d_mlp=64,
                      mlp_multiple_of=16, mixer="attention", max_seq_len=16)
    write_run(str(tmp_path), cfg, model_weights(Mamba3LM(cfg, rngs=nnx.Rngs(0))))
    argv = ["--workdir", str(tmp_path), "--prompt", "hello", "--ignore_eos"]  # 5 tokens
    assert generate_cli.main(argv + ["--max_new_tokens", "12"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert "prompt length 5 + max_new_tokens 12 exceeds the KV cache (max_seq_len = 16)" in err
    assert generate_cli.main(argv + ["--max_new_tokens", "11", "--temperature", "0"]) == 0
