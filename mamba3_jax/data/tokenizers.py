"""Tokenizers behind one small protocol.

Every tokenizer also reports how many UTF-8 bytes each token id stands for
(``token_byte_lengths``), so that the loss can be reported in bits per byte, a
number that does not depend on the tokenizer. Special tokens count 0 bytes.

Implementations:

* ``ByteTokenizer`` (default): ids 0..255 are the raw UTF-8 bytes, id 256 is EOS;
  ``vocab_size == 257``.
* ``TiktokenTokenizer``: GPT-2 and cl100k_base BPE, built fully offline from the
  files in ``<data_dir>/tokenizers/`` (no network, no tiktoken cache dir).
* ``HFTokenizer``: any HuggingFace ``tokenizer.json`` (needs ``pip install tokenizers``).
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from mamba3_jax.data.paths import default_data_dir


@runtime_checkable
class Tokenizer(Protocol):
    """What the data pipeline needs from a tokenizer."""

    vocab_size: int
    eos_id: int | None

    def encode(self, text: str) -> list[int]:
        """Text -> ids. Special-token text (e.g. ``<|endoftext|>``) is plain text."""
        ...

    def decode(self, ids: Sequence[int]) -> str:
        """Ids -> text."""
        ...

    def token_byte_lengths(self) -> np.ndarray:
        """int32 array (vocab_size,): UTF-8 bytes per id; 0 for special/unused ids."""
        ...


def encode_array(tokenizer: Tokenizer, text: str) -> np.ndarray:
    """Encodes ``text`` to an int32 array, using a tokenizer's fast path if it has one."""
    fast = getattr(tokenizer, "encode_array", None)
    if fast is not None:
        return fast(text)
    return np.asarray(tokenizer.encode(text), dtype=np.int32)


# --------------------------------------------------------------------------- byte


class ByteTokenizer:
    """Raw UTF-8 bytes: ids 0..255 are bytes, id 256 is EOS (vocab_size 257).

    Needs no files and is exactly reversible for any text, which makes it the
    default for small experiments; bits per byte is then simply loss / ln 2.
    """

    name = "byte"
    vocab_size = 257
    eos_id = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8", errors="replace"))

    def encode_array(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8", errors="replace"), dtype=np.uint8).astype(
            np.int32
        )

    def decode(self, ids: Sequence[int]) -> str:
        """Decodes byte ids; EOS and out-of-range ids are dropped, bad UTF-8 is replaced."""
        arr = np.asarray(ids, dtype=np.int64).reshape(-1)
        arr = arr[(arr >= 0) & (arr < 256)]
        return arr.astype(np.uint8).tobytes().decode("utf-8", errors="replace")

    def token_byte_lengths(self) -> np.ndarray:
        lengths = np.ones(self.vocab_size, dtype=np.int32)
        lengths[self.eos_id] = 0
        return lengths

    def __repr__(self) -> str:
        return "ByteTokenizer()"


# ----------------------------------------------------------------------- tiktoken

ENDOFTEXT = "<|endoftext|>"

# Split patterns of the two encodings; they must equal the ones tiktoken uses
# (tiktoken_ext/openai_public.py). tests/data/test_tokenizers.py checks that our
# offline encodings give the same ids as tiktoken's own registry.
_GPT2_PATTERN = (
    r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
)
_CL100K_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
    r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
)

# sha256 of the bundled files (the same values tiktoken pins for its downloads).
_FILE_SHA256 = {
    "gpt2/encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "gpt2/vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    "cl100k_base.tiktoken": "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
}

TIKTOKEN_ENCODINGS = ("gpt2", "cl100k_base")


def _read_checked(files_dir: Path, rel: str) -> bytes:
    path = files_dir / rel
    if not path.is_file():
        raise FileNotFoundError(
            f"Tokenizer file {str(path)!r} is missing. Expected the bundled tokenizer files "
            f"under {str(files_dir)!r}: gpt2/encoder.json, gpt2/vocab.bpe and "
            "cl100k_base.tiktoken (see shared/data/PROVENANCE.md)."
        )
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != _FILE_SHA256[rel]:
        raise ValueError(
            f"Tokenizer file {str(path)!r} has sha256 {digest}, expected {_FILE_SHA256[rel]}; "
            "the file is corrupt or a different version."
        )
    return data


@functools.lru_cache(maxsize=1)
def gpt2_byte_to_char() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used in its vocab files.

    Printable, non-space Latin-1 bytes stand for themselves; the remaining bytes
    are given the characters 256, 257, ... in byte order.
    """
    table: dict[int, str] = {}
    extra = 0
    for b in range(256):
        if chr(b).isprintable() and chr(b) != " ":
            table[b] = chr(b)
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _gpt2_char_to_byte() -> dict[str, int]:
    return {c: b for b, c in gpt2_byte_to_char().items()}


def _gpt2_mergeable_ranks(encoder_json: bytes, vocab_bpe: bytes) -> dict[bytes, int]:
    """Token bytes -> rank from GPT-2's encoder.json, checked against vocab.bpe."""
    char_to_byte = _gpt2_char_to_byte()

    def to_bytes(s: str) -> bytes:
        return bytes(char_to_byte[c] for c in s)

    encoder = json.loads(encoder_json)
    ranks = {to_bytes(tok): rank for tok, rank in encoder.items() if tok != ENDOFTEXT}
    # vocab.bpe lists merges in priority order: merge i creates token rank 256 + i.
    merges = vocab_bpe.decode("utf-8").split("\n")[1:]
    merges = [m for m in merges if m]
    if len(ranks) != 256 + len(merges):
        raise ValueError(
            f"gpt2 encoder.json has {len(ranks)} tokens but vocab.bpe has {len(merges)} merges"
        )
    for i, line in enumerate(merges):
        first, second = line.split()
        if ranks.get(to_bytes(first) + to_bytes(second)) != 256 + i:
            raise ValueError(f"gpt2 vocab.bpe merge {i} ({line!r}) disagrees with encoder.json")
    return ranks


def _parse_tiktoken_file(data: bytes) -> dict[bytes, int]:
    ranks = {}
    for line in data.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


@functools.lru_cache(maxsize=4)
def _load_tiktoken_encoding(name: str, files_dir: str):
    import tiktoken

    root = Path(files_dir)
    if name == "gpt2":
        ranks = _gpt2_mergeable_ranks(
            _read_checked(root, "gpt2/encoder.json"), _read_checked(root, "gpt2/vocab.bpe")
        )
        return tiktoken.Encoding(
            name="gpt2",
            pat_str=_GPT2_PATTERN,
            mergeable_ranks=ranks,
            special_tokens={ENDOFTEXT: 50256},
            explicit_n_vocab=50257,
        )
    if name == "cl100k_base":
        ranks = _parse_tiktoken_file(_read_checked(root, "cl100k_base.tiktoken"))
        return tiktoken.Encoding(
            name="cl100k_base",
            pat_str=_CL100K_PATTERN,
            mergeable_ranks=ranks,
            special_tokens={
                ENDOFTEXT: 100257,
                "<|fim_prefix|>": 100258,
                "<|fim_middle|>": 100259,
                "<|fim_suffix|>": 100260,
                "<|endofprompt|>": 100276,
            },
        )
    raise ValueError(f"Unknown tiktoken encoding {name!r}; valid: {TIKTOKEN_ENCODINGS}")


class TiktokenTokenizer:
    """GPT-2 / cl100k_base BPE via tiktoken, built offline from local files.

    ``files_dir`` defaults to ``default_data_dir() / "tokenizers"``. EOS is
    ``<|endoftext|>``. ``encode`` treats special-token text in the input as plain
    text (``encode_ordinary``), so arbitrary training text never raises.
    """

    def __init__(self, name: str = "gpt2", files_dir: str | os.PathLike | None = None):
        if name not in TIKTOKEN_ENCODINGS:
            raise ValueError(f"Unknown tiktoken encoding {name!r}; valid: {TIKTOKEN_ENCODINGS}")
        if files_dir is None:
            files_dir = default_data_dir() / "tokenizers"
        self.name = name
        self.files_dir = str(Path(files_dir).resolve())
        self._enc = _load_tiktoken_encoding(name, self.files_dir)
        self.vocab_size = int(self._enc.n_vocab)
        self.eos_id = int(self._enc.eot_token)

    @property
    def encoding(self):
        """The underlying ``tiktoken.Encoding``."""
        return self._enc

    def encode(self, text: str) -> list[int]:
        return self._enc.encode_ordinary(text)

    def encode_array(self, text: str) -> np.ndarray:
        return np.asarray(self._enc.encode_ordinary(text), dtype=np.int32)

    def decode(self, ids: Sequence[int]) -> str:
        return self._enc.decode([int(i) for i in ids], errors="replace")

    def token_byte_lengths(self) -> np.ndarray:
        return _tiktoken_byte_lengths(self.name, self.files_dir)

    # tiktoken.Encoding is rebuilt from the files after unpickling (cheap, cached).
    def __getstate__(self) -> dict[str, Any]:
        return {"name": self.name, "files_dir": self.files_dir}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["name"], state["files_dir"])

    def __repr__(self) -> str:
        return f"TiktokenTokenizer({self.name!r}, files_dir={self.files_dir!r})"


@functools.lru_cache(maxsize=4)
def _tiktoken_byte_lengths(name: str, files_dir: str) -> np.ndarray:
    enc = _load_tiktoken_encoding(name, files_dir)
    special_ids = {enc.encode_single_token(s) for s in enc.special_tokens_set}
    lengths = np.zeros(enc.n_vocab, dtype=np.int32)
    for i in range(enc.n_vocab):
        if i in special_ids:
            continue  # special tokens stand for no input bytes
        try:
            lengths[i] = len(enc.decode_single_token_bytes(i))
        except KeyError:  # unused ids (cl100k_base has a gap before <|endofprompt|>)
            pass
    lengths.flags.writeable = False
    return lengths


# ----------------------------------------------------------------- HuggingFace


def _import_hf_tokenizers():
    try:
        import tokenizers
    except ImportError as e:
        raise ImportError(
            "HFTokenizer needs the HuggingFace `tokenizers` package: pip install tokenizers"
        ) from e
    return tokenizers


def _component_types(component: Any) -> set[str]:
    """All ``type`` names in a (possibly nested ``Sequence``) tokenizer.json component."""
    types: set[str] = set()
    if isinstance(component, Mapping):
        if "type" in component:
            types.add(str(component["type"]))
        for key in ("pretokenizers", "decoders", "normalizers", "processors"):
            for sub in component.get(key) or ():
                types |= _component_types(sub)
    return types


def hf_token_byte_lengths(tokenizer_json: Mapping[str, Any]) -> np.ndarray:
    """UTF-8 bytes per id for a parsed HuggingFace ``tokenizer.json``.

    Exact for byte-level BPE (GPT-2 style, ``ByteLevel`` pre-tokenizer/decoder)
    and for SentencePiece-style vocabularies (``▁`` is one space byte, ``<0xNN>``
    byte-fallback tokens are one byte). For WordPiece the ``##`` prefix is
    dropped; word-initial spaces are not counted there, so bits per byte is only
    approximate for WordPiece. Special added tokens count 0 bytes.
    """
    model = tokenizer_json.get("model") or {}
    vocab = model.get("vocab") or {}
    if isinstance(vocab, list):  # Unigram: [[piece, score], ...], id = index
        id_to_token = {i: piece for i, (piece, _score) in enumerate(vocab)}
    else:
        id_to_token = {int(i): tok for tok, i in vocab.items()}
    added = tokenizer_json.get("added_tokens") or []
    max_id = max([*id_to_token.keys(), *(int(t["id"]) for t in added)], default=-1)
    lengths = np.zeros(max_id + 1, dtype=np.int32)

    types = _component_types(tokenizer_json.get("pre_tokenizer")) | _component_types(
        tokenizer_json.get("decoder")
    )
    byte_level = "ByteLevel" in types
    char_to_byte = _gpt2_char_to_byte() if byte_level else {}
    prefix = model.get("continuing_subword_prefix") or ""
    if model.get("type") == "WordPiece" and not prefix:
        prefix = "##"

    for i, tok in id_to_token.items():
        if byte_level and all(c in char_to_byte for c in tok):
            lengths[i] = len(tok)  # one character per byte
            continue
        if len(tok) == 6 and tok.startswith("<0x") and tok.endswith(">"):
            lengths[i] = 1  # SentencePiece byte fallback
            continue
        if prefix and tok.startswith(prefix):
            tok = tok[len(prefix) :]
        lengths[i] = len(tok.replace("\u2581", " ").encode("utf-8"))
    for t in added:
        i = int(t["id"])
        lengths[i] = 0 if t.get("special", False) else len(t["content"].encode("utf-8"))
    return lengths


_HF_EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "[SEP]")


class HFTokenizer:
    """A HuggingFace ``tokenizer.json`` via the ``tokenizers`` package (imported lazily).

    ``eos_token`` names the EOS token; by default the first of
    ``<|endoftext|>, </s>, <eos>, <|end_of_text|>, [SEP]`` found in the vocabulary.
    """

    def __init__(self, path: str | os.PathLike, eos_token: str | None = None):
        self.path = str(path)
        if not Path(self.path).is_file():
            raise FileNotFoundError(f"tokenizer.json not found: {self.path!r}")
        tokenizers = _import_hf_tokenizers()
        self._tok = tokenizers.Tokenizer.from_file(self.path)
        self.name = f"hf:{self.path}"
        with open(self.path, encoding="utf-8") as f:
            self._byte_lengths = hf_token_byte_lengths(json.load(f))
        self.vocab_size = max(
            int(self._tok.get_vocab_size(with_added_tokens=True)), len(self._byte_lengths)
        )
        if len(self._byte_lengths) < self.vocab_size:
            self._byte_lengths = np.pad(
                self._byte_lengths, (0, self.vocab_size - len(self._byte_lengths))
            )
        self.eos_id = None
        for cand in [eos_token] if eos_token is not None else _HF_EOS_CANDIDATES:
            tid = self._tok.token_to_id(cand)
            if tid is not None:
                self.eos_id = int(tid)
                break
        if eos_token is not None and self.eos_id is None:
            raise ValueError(f"eos_token {eos_token!r} is not in {self.path!r}")

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def token_byte_lengths(self) -> np.ndarray:
        return self._byte_lengths

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "eos_id": self.eos_id}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"])
        self.eos_id = state["eos_id"]

    def __repr__(self) -> str:
        return f"HFTokenizer({self.path!r})"


# ----------------------------------------------------------------------- factory

TOKENIZER_NAMES = ("byte", "gpt2", "cl100k_base", "<path>/tokenizer.json")


def get_tokenizer(name: str, **kwargs: Any) -> Tokenizer:
    """Builds a tokenizer by name: "byte", "gpt2", "cl100k_base" or a tokenizer.json path.

    Extra keyword arguments go to the constructor (e.g. ``files_dir`` for tiktoken).
    """
    if name == "byte":
        if kwargs:
            raise TypeError(f"ByteTokenizer takes no options, got {sorted(kwargs)}")
        return ByteTokenizer()
    if name in TIKTOKEN_ENCODINGS:
        return TiktokenTokenizer(name, **kwargs)
    if str(name).endswith("tokenizer.json"):
        return HFTokenizer(name, **kwargs)
    raise ValueError(f"Unknown tokenizer {name!r}; valid names: {', '.join(TOKENIZER_NAMES)}")
