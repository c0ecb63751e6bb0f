"""The README's main job: a tiny byte-level Mamba-3 on the bundled books corpus, on a 2-core CPU.

    python -m mamba3_jax.train --config configs/tiny_cpu.py --workdir runs/tiny

About 0.45M parameters (d_model 128, 2 layers, d_state 32, SISO), sequences of 256 bytes, 16
sequences per step, 400 steps (~1.6M bytes). Evaluates bits per byte on the validation books.
`--config configs/tiny_cpu.py:shakespeare` trains on Tiny Shakespeare instead.
"""

from mamba3_jax.training.config import base_config


def get_config(arg: str = ""):
    c = base_config()
    m = c.model
    m.d_model = 128
    m.n_layer = 2
    m.d_state = 32
    m.headdim = 64
    m.expand = 2
    m.mimo_rank = 1
    m.scan_backend = "chunked"
    m.dtype = "float32"
    m.param_dtype = "float32"

    c.data.tokenizer = "byte"
    c.data.seq_len = 256
    c.data.batch_size = 16
    if arg == "shakespeare":
        c.data.train_source = {"kind": "tinyshakespeare", "split": "train"}
        c.data.eval_source = {"kind": "tinyshakespeare", "split": "valid"}
    elif arg:
        raise ValueError(f"unknown tiny_cpu variant {arg!r}; use '' or 'shakespeare'")

    c.optim.peak_lr = 3e-3
    c.optim.end_lr = 3e-4
    c.optim.warmup_steps = 40
    c.optim.schedule = "cosine"
    c.optim.weight_decay = 0.1

    c.train.steps = 400
    c.train.log_every = 10
    c.train.eval_every = 100
    c.train.eval_steps = 16
    c.train.checkpoint_every = 100
    c.train.keep = 2
    return c
