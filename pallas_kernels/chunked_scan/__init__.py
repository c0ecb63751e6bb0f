"""Chunked SSM for prefill and training: `api.chunked_scan` (public function, implementation
registry), `reference.py` (the oracle), one file per backend (`pallas_triton*.py`,
`pallas_mosaic_gpu.py`, `pallas_mosaic_tpu.py`), `shapes.py` (named shapes shared by tests and
the benchmark)."""
