"""Small models for quick comparisons on one GPU (minutes per run).

    python -m mamba3_jax.train --config configs/small_gpu.py --workdir runs/small_siso
    python -m mamba3_jax.train --config configs/small_gpu.py:mimo --workdir runs/small_mimo
    python experiments/sweep.py --config configs/small_gpu.py \
        --sweep model.d_state=16,32,64,128 --sweep model.mimo_rank=1,4 \
        --workdir runs/sweep

~52M parameters (26M without the embedding; d_model 512, 8 layers), GPT-2 tokenizer, the books
corpus, context 1024, 64K tokens per step, bf16 compute with fp32 master weights. The `mimo`
variant uses MIMO rank 4 and, as in the paper, a narrower MLP so that the parameter count matches
SISO.
"""

from mamba3_jax.training.config import base_config

VARIANTS = ("siso", "mimo")


def get_config(arg: str = "siso"):
    variant = arg or "siso"
    if variant not in VARIANTS:
        raise ValueError(f"unknown small_gpu variant {variant!r}; valid: {VARIANTS}")
    c = base_config()
    m = c.model
    m.d_model = 512
    m.n_layer = 8
    m.d_state = 64
    m.headdim = 64
    m.expand = 2
    m.mimo_rank = 4 if variant == "mimo" else 1
    # MIMO adds 2*h*r*n B/C bias and 3*h*r*p scale params per layer and wider B/C projections;
    # a narrower MLP keeps the total close to SISO (cf. the paper's 1500 -> 1264 at 180M).
    m.d_mlp = 896 if variant == "mimo" else 1024
    m.mlp_multiple_of = 64
    m.scan_backend = "auto"
    m.scan_layers = True  # one layer compiled once (lax.scan); same maths as the unrolled model
    m.dtype = "bfloat16"
    m.param_dtype = "float32"

    c.data.tokenizer = "gpt2"
    c.data.vocab_multiple = 128
    c.data.seq_len = 1024
    c.data.batch_size = 64
    c.data.num_threads = 4

    c.optim.peak_lr = 3e-3
    c.optim.end_lr = 1e-5
    c.optim.warmup_steps = 200
    c.optim.schedule = "cosine"

    # the paper configs' names (their SISO runs also keep the kernels' outputs: 1.5B 4.5% faster,
    # 180M a tie; not timed at this size)
    c.train.remat = "names:in_proj,ssm_out,mixer_out,mlp_hidden"
    c.train.steps = 3000
    c.train.log_every = 20
    c.train.eval_every = 500
    c.train.eval_steps = 20
    c.train.checkpoint_every = 500
    return c
