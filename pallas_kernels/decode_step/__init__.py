"""Single-token decode step: `pallas_triton.decode_step` (GPU, state updated in place; launch
shapes `DecodeBlocks`), `pallas_mosaic_tpu.decode_core_tpu` (TPU), `reference.reference_step`
(the oracle, with `decode_step`'s contract) and `shapes.py` (named shapes shared by the tests and
the benchmark). Backends and the one-token path of the step backends:
`pallas_kernels.backend_table()`."""
