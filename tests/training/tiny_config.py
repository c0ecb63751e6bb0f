"""A very small training config for tests (also usable from the CLI:
`python -m mamba3_jax.train --config tests/training/tiny_config.py --workdir /tmp/x`)."""

from mamba3_jax.training.config import base_config


def get_config(arg: str = ""):
    c = base_config()
    m = c.model
    m.d_model = 32
    m.n_layer = 1
    m.d_state = 16
    m.headdim = 16
    m.expand = 2
    m.chunk_size = 16
    m.d_mlp = 64
    m.mlp_multiple_of = 16
    m.scan_backend = "chunked"
    m.mimo_rank = 2 if arg == "mimo" else 1
    c.data.train_source = {"kind": "tinyshakespeare", "split": "train"}
    if arg.startswith("text="):  # tiny_config.py:text=/path/a.txt trains on that file
        c.data.train_source = {"kind": "text", "paths": [arg[len("text="):]]}
    c.data.eval_source = {"kind": "tinyshakespeare", "split": "valid"}
    c.data.tokenizer = "byte"
    c.data.seq_len = 32
    c.data.batch_size = 4
    c.data.prefetch = 0
    c.optim.peak_lr = 1e-2
    c.optim.end_lr = 1e-3
    c.optim.warmup_steps = 2
    c.train.steps = 8
    c.train.log_every = 1
    c.train.eval_every = 4
    c.train.eval_steps = 2
    c.train.checkpoint_every = 2
    c.train.keep = 10
    c.train.tensorboard = False
    c.train.progress = False
    return c
