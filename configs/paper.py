"""The Mamba-3 paper's language-model shapes and recipe (one file, four sizes, SISO or MIMO, the
Transformer++ and Gated DeltaNet baselines and the 5:1 hybrid).

    python -m mamba3_jax.train --config configs/paper.py:180m --workdir runs/180m
    python -m mamba3_jax.train --config configs/paper.py:440m_mimo --workdir runs/440m_mimo

Argument: `<size>[_<variant>]`, size in 180m | 440m | 880m | 1.5b, variant siso (default) | mimo
| transformer | gdn | hybrid.

Shapes: N (d_state) 128, P (headdim) 64, expand 2; MIMO rank 4 with the narrower MLP:
    180m  12 x 768,  MLP 1500 (SISO) / 1264 (MIMO), peak LR 3e-3
    440m  24 x 1024, MLP 2048 / 1792,               peak LR 1.5e-3
    880m  24 x 1536, MLP 3072 / 2800,               peak LR 1.25e-3
    1.5b  24 x 2048, MLP 4096 / 3824,               peak LR 1e-3
Transformer++ (`_transformer`, mixer="attention"): heads of 64 (d_model / 64 of them), RoPE,
SwiGLU, RMSNorm, tied embeddings, same recipe; the MLP is widened so that the parameter count
matches the SISO model of that size within 0.5% (the brief gives no Transformer widths):
    180m MLP 2140, 440m 2880, 880m 4224, 1.5b 5632.
Gated DeltaNet (`_gdn`, mixer="gated_deltanet"): short conv 4, keys of 128 and values of 256
channels per head (d_model / 128 heads), so the recurrent state per layer equals the SISO
model's (heads x 256 x 128 = 2 d_model / 64 heads x 64 x 128); beta in (0, 1) (the LM setting;
`negative_eigenvalues` is the state-tracking variant). The brief gives no GDN widths either: the
MLP is narrowed to match the SISO parameter count within 0.1%:
    180m MLP 1104, 440m 1488, 880m 2176, 1.5b 2880.
Hybrid (`_hybrid`): the SISO model with every sixth layer attention without positional encoding
(layer_pattern "MMMMMA", NoPE); scan_layers scans over the pattern's repeats.
Recipe: context 2048, ~0.5M tokens per step (256 x 2048), bf16 compute with fp32 master weights,
AdamW (0.9, 0.95), weight decay 0.1, clip 1.0, linear warmup then cosine to 1e-5,
100B tokens (190,735 steps).

Differences from the paper (documented in docs/training.md):
* Tokenizer: the paper uses Llama-3.1's (128K vocab), which is not available offline; we default
  to cl100k_base (100,277 tokens, padded to 100,352). Point data.tokenizer at a Llama-3.1
  tokenizer.json to match it.
* Data: the books corpus stands in for the paper's FineWeb-Edu; set data.train_source /
  data.eval_source to your own jsonl/parquet/arrayrecord files.
* Warmup length is not given in the brief; we use 2,000 steps (~1% of training).
"""

from mamba3_jax.training.config import base_config

SIZES = {
    #        n_layer d_model  mlp_siso mlp_mimo peak_lr
    "180m": (12, 768, 1500, 1264, 3e-3),
    "440m": (24, 1024, 2048, 1792, 1.5e-3),
    "880m": (24, 1536, 3072, 2800, 1.25e-3),
    "1.5b": (24, 2048, 4096, 3824, 1e-3),
}
# Transformer++ MLP widths: parameter count of the SISO model of the same size (see above)
TRANSFORMER_MLP = {"180m": 2140, "440m": 2880, "880m": 4224, "1.5b": 5632}
# Gated DeltaNet MLP widths: parameter count of the SISO model of the same size (see above)
GDN_MLP = {"180m": 1104, "440m": 1488, "880m": 2176, "1.5b": 2880}
VARIANTS = ("siso", "mimo", "transformer", "gdn", "hybrid")
REMAT = "names:in_proj,ssm_out,mixer_out,mlp_hidden"
TOKENS_PER_STEP = 256 * 2048  # 524,288
TRAIN_TOKENS = 100_000_000_000


def parse_arg(arg: str) -> tuple[str, str]:
    arg = (arg or "180m").lower()
    size, _, variant = arg.partition("_")
    variant = variant or "siso"
    if size not in SIZES or variant not in VARIANTS:
        raise ValueError(f"unknown paper config {arg!r}: use <size>[_<variant>] with size in "
                         f"{sorted(SIZES)} and variant in {VARIANTS}, e.g. '440m_mimo'")
    return size, variant


def get_config(arg: str = "180m"):
    size, variant = parse_arg(arg)
    n_layer, d_model, mlp_siso, mlp_mimo, lr = SIZES[size]
    c = base_config()
    m = c.model
    m.n_layer = n_layer
    m.d_model = d_model
    m.d_state = 128
    m.headdim = 64
    m.expand = 2
    m.mimo_rank = 4 if variant == "mimo" else 1
    m.d_mlp = mlp_mimo if variant == "mimo" else mlp_siso
    m.mlp_multiple_of = 1  # the paper's widths exactly (1500, 1264, 2800, 3824 are not x128)
    if variant == "transformer":
        m.mixer = "attention"
        m.d_mlp = TRANSFORMER_MLP[size]
        m.max_seq_len = 2048  # KV cache for generation: the training context
    elif variant == "gdn":
        m.mixer = "gated_deltanet"
        m.d_conv = 4
        m.headdim = 256  # value channels per head; keys: d_state = 128
        m.d_mlp = GDN_MLP[size]
    elif variant == "hybrid":
        m.layer_pattern = "MMMMMA"
        m.attn_rope = False  # NoPE, as the paper's hybrids
        m.max_seq_len = 2048
    m.scan_backend = "auto"
    # Mamba-3 SISO: layers unrolled, traced once (model._jitted_layer) and inlined by XLA; the
    # 1.5B train step compiles in 56 s and runs 700 ms (42.1% MFU) on one H200, where the layer
    # scan compiles in 16-22 s but runs 838 ms (its stacked residuals and weights cost copies);
    # docs/benchmarks.md, session 14. The other variants at 24 layers scan over the layers (one
    # layer, or one period of the hybrid's pattern, compiled once)
    m.scan_layers = n_layer > 12 and variant != "siso"
    m.dtype = "bfloat16"
    m.param_dtype = "float32"
    m.vocab_size = 0  # from the tokenizer

    c.data.tokenizer = "cl100k_base"
    c.data.vocab_multiple = 128
    c.data.seq_len = 2048
    c.data.batch_size = TOKENS_PER_STEP // 2048  # 256 sequences
    c.data.num_threads = 8
    c.data.eval_batch_size = 64

    c.optim.peak_lr = lr
    c.optim.end_lr = 1e-5
    c.optim.warmup_steps = 2000
    c.optim.schedule = "cosine"
    c.optim.b1 = 0.9
    c.optim.b2 = 0.95
    c.optim.weight_decay = 0.1
    c.optim.clip_norm = 1.0

    c.train.steps = TRAIN_TOKENS // TOKENS_PER_STEP  # 190,734
    c.train.log_every = 50
    c.train.eval_every = 2000
    c.train.eval_steps = 50
    c.train.checkpoint_every = 1000
    c.train.keep = 3
    c.train.grad_accum = 1  # raise it when 256 x 2048 does not fit (must divide the batch)
    c.train.loss_chunk = 512  # 100K-vocab logits 512 positions at a time (memory)
    # keep the big matmul outputs, recompute the SSM internals and elementwise work (~3% more
    # FLOPs, ~10x less activation memory than "none"; docs/training.md "Throughput"). SISO also
    # keeps the kernels' outputs (the core is not run again in the backward): on one H200,
    # 1.5B 970 vs 1015 ms a step (72 vs 51 GiB), 180M 751 vs 755 ms (44 vs 28 GiB); MIMO is
    # 14% slower with them (1329 vs 1163 ms, 98 vs 36 GiB: their copies across the layer scan),
    # so it recomputes them
    c.train.remat = REMAT + (",kernels" if variant == "siso" else "")
    if variant == "siso" and n_layer > 12:
        # 24 unrolled SISO layers keep every activation: 23% fewer operations for XLA to
        # compile (56 vs 61 s at 1.5B) and no recompute (700 vs 708 ms), at 81 vs 67 GiB for 8 x
        # 2048 tokens a microbatch (session 14); on an 80 GB device set train.remat to
        # configs/paper.py's REMAT + ",kernels" or shrink the microbatch (train.grad_accum)
        c.train.remat = "none"
    c.mesh.fsdp = 1  # e.g. 8 on one 8-GPU host for the larger sizes
    return c
