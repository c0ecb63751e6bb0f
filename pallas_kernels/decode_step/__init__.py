"""Single-token decode step: `pallas_triton.decode_step` (GPU, state updated in place) and
`pallas_mosaic_tpu.decode_core_tpu` (TPU). Backends: `pallas_kernels.backend_table()`."""
