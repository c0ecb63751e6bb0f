"""Data pipeline: document sources, tokenizers and packed LM batches (see docs/data.md)."""

from mamba3_jax.data.paths import default_cache_dir, default_data_dir
from mamba3_jax.data.pipeline import (
    BATCH_KEYS,
    BATCH_SPEC,
    PackedLMIterDataset,
    batch_shapes,
    bits_per_byte,
    document_dataset,
    eval_batches,
    host_shard,
    make_lm_dataset,
    restore_iterator_state,
    rows_to_batch,
    save_iterator_state,
)
from mamba3_jax.data.sources import (
    ArrayRecordSource,
    BooksSource,
    InMemorySource,
    JsonlSource,
    ParquetSource,
    TextFileSource,
    get_source,
    tinyshakespeare_source,
)
from mamba3_jax.data.tokenizers import (
    ByteTokenizer,
    HFTokenizer,
    TiktokenTokenizer,
    Tokenizer,
    get_tokenizer,
)

__all__ = [
    "ArrayRecordSource",
    "BATCH_KEYS",
    "BATCH_SPEC",
    "BooksSource",
    "ByteTokenizer",
    "HFTokenizer",
    "InMemorySource",
    "JsonlSource",
    "PackedLMIterDataset",
    "ParquetSource",
    "TextFileSource",
    "TiktokenTokenizer",
    "Tokenizer",
    "batch_shapes",
    "bits_per_byte",
    "default_cache_dir",
    "default_data_dir",
    "document_dataset",
    "eval_batches",
    "get_source",
    "get_tokenizer",
    "host_shard",
    "make_lm_dataset",
    "restore_iterator_state",
    "rows_to_batch",
    "save_iterator_state",
    "tinyshakespeare_source",
]
