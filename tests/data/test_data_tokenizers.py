"""Tokenizers: exact round trips, byte accounting, offline tiktoken equivalence."""

import json
import pickle
import shutil

import numpy as np
import pytest

from mamba3_jax.data.tokenizers import (
    ByteTokenizer,
    HFTokenizer,
    TiktokenTokenizer,
    Tokenizer,
    get_tokenizer,
    gpt2_byte_to_char,
    hf_token_byte_lengths,
)


def test_byte_tokenizer_roundtrip_and_bytes():
    tok = ByteTokenizer()
    text = "héllo wörld — 東京 🙂\n"
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert tok.vocab_size == 257 and tok.eos_id == 256
    assert tok.decode(ids) == text
    assert tok.decode(ids + [tok.eos_id]) == text  # EOS renders as nothing
    np.testing.assert_array_equal(tok.encode_array(text), ids)
    assert tok.encode_array(text).dtype == np.int32
    lengths = tok.token_byte_lengths()
    assert lengths.shape == (257,) and lengths.dtype == np.int32
    assert lengths[256] == 0 and lengths[:256].min() == 1
    assert lengths[ids].sum() == len(text.encode("utf-8"))
    assert isinstance(tok, Tokenizer)


@pytest.mark.parametrize(
    "name, vocab_size, eos_id", [("gpt2", 50257, 50256), ("cl100k_base", 100277, 100257)]
)
def test_tiktoken_roundtrip_and_bytes(name, vocab_size, eos_id, data_dir, sample_text):
    tok = get_tokenizer(name)
    assert isinstance(tok, TiktokenTokenizer) and isinstance(tok, Tokenizer)
    assert tok.vocab_size == vocab_size and tok.eos_id == eos_id
    ids = tok.encode(sample_text)
    assert len(ids) < len(sample_text.encode()) / 2  # real BPE merges happen
    assert tok.decode(ids) == sample_text
    lengths = tok.token_byte_lengths()
    assert lengths.shape == (vocab_size,) and lengths.dtype == np.int32
    assert lengths[eos_id] == 0
    assert lengths[ids].sum() == len(sample_text.encode("utf-8"))
    # Special-token text is ordinary text: no EOS id, still exact bytes.
    special = "a <|endoftext|> b"
    sids = tok.encode(special)
    assert eos_id not in sids and tok.decode(sids) == special
    assert lengths[sids].sum() == len(special)


def test_tiktoken_matches_tiktoken_registry(data_dir, sample_text, tmp_path, monkeypatch):
    """Our offline Encoding must give the ids of tiktoken.get_encoding (via a cache dir)."""
    import tiktoken
    import tiktoken.registry

    files = data_dir / "tokenizers"
    urls = {
        "cl100k_base.tiktoken": "9b5ad71b2ce5302211f9c61530b329a4922fc6a4",
        "gpt2/vocab.bpe": "6d1cbeee0f20b3d9449abfede4726ed8212e3aee",
        "gpt2/encoder.json": "6c7ea1a7e38e3a7f062df639a5b80947f075ffe6",
    }
    for rel, key in urls.items():
        shutil.copy(files / rel, tmp_path / key)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})  # do not reuse/leave cached ones
    for name in ("gpt2", "cl100k_base"):
        ref = tiktoken.get_encoding(name)
        ours = TiktokenTokenizer(name)
        assert ours.encoding._pat_str == ref._pat_str
        assert ours.encoding._special_tokens == ref._special_tokens
        assert ours.vocab_size == ref.n_vocab
        assert ours.encode(sample_text) == ref.encode_ordinary(sample_text)


def test_tiktoken_missing_files_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="cl100k_base.tiktoken"):
        TiktokenTokenizer("cl100k_base", files_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="encoder.json"):
        TiktokenTokenizer("gpt2", files_dir=tmp_path)


def test_tiktoken_corrupt_file_error(tmp_path, data_dir):
    (tmp_path / "cl100k_base.tiktoken").write_bytes(
        (data_dir / "tokenizers" / "cl100k_base.tiktoken").read_bytes()[:-10]
    )
    with pytest.raises(ValueError, match="sha256"):
        TiktokenTokenizer("cl100k_base", files_dir=tmp_path)


def test_tiktoken_pickles(data_dir):
    tok = TiktokenTokenizer("gpt2")
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.encode("Hello there") == tok.encode("Hello there")


def test_get_tokenizer_unknown_name():
    with pytest.raises(ValueError, match="byte.*gpt2.*cl100k_base"):
        get_tokenizer("llama")
    assert isinstance(get_tokenizer("byte"), ByteTokenizer)


def test_hf_byte_lengths_byte_level_bpe():
    to_char = gpt2_byte_to_char()
    vocab = {to_char[b]: b for b in range(256)}
    vocab["Ġthe"] = 256  # " the"
    vocab["".join(to_char[b] for b in "é".encode())] = 257
    spec = {
        "model": {"type": "BPE", "vocab": vocab},
        "pre_tokenizer": {"type": "ByteLevel"},
        "added_tokens": [{"id": 258, "content": "<|endoftext|>", "special": True}],
    }
    lengths = hf_token_byte_lengths(spec)
    assert lengths.shape == (259,)
    assert lengths[:256].tolist() == [1] * 256
    assert lengths[256] == 4 and lengths[257] == 2 and lengths[258] == 0


def test_hf_byte_lengths_sentencepiece_and_wordpiece():
    sp = {
        "model": {"type": "Unigram", "vocab": [["<unk>", 0.0], ["▁the", -1.0], ["<0x0A>", -2.0]]},
        "pre_tokenizer": {"type": "Metaspace"},
        "added_tokens": [{"id": 0, "content": "<unk>", "special": True}],
    }
    assert hf_token_byte_lengths(sp).tolist() == [0, 4, 1]
    wp = {
        "model": {"type": "WordPiece", "vocab": {"[SEP]": 0, "play": 1, "##ing": 2}},
        "added_tokens": [{"id": 0, "content": "[SEP]", "special": True}],
    }
    assert hf_token_byte_lengths(wp).tolist() == [0, 4, 3]


def test_hf_tokenizer_roundtrip(tmp_path, sample_text):
    tokenizers = pytest.importorskip("tokenizers")
    trainer_tok = tokenizers.ByteLevelBPETokenizer()
    trainer_tok.train_from_iterator(
        [sample_text], vocab_size=400, min_frequency=2, special_tokens=["<|endoftext|>"]
    )
    path = tmp_path / "tokenizer.json"
    trainer_tok.save(str(path))
    tok = get_tokenizer(str(path))
    assert isinstance(tok, HFTokenizer)
    assert tok.eos_id == tok._tok.token_to_id("<|endoftext|>")
    text = "Hello naïve world 🙂"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    lengths = tok.token_byte_lengths()
    assert lengths[ids].sum() == len(text.encode())
    assert lengths[tok.eos_id] == 0
    # token_byte_lengths from the JSON alone agrees with the live tokenizer
    assert len(lengths) == tok.vocab_size
    assert json.loads(path.read_text())["model"]["type"] == "BPE"


def test_hf_tokenizer_missing_package(tmp_path):
    try:
        import tokenizers  # noqa: F401

        pytest.skip("tokenizers is installed")
    except ImportError:
        pass
    path = tmp_path / "tokenizer.json"
    path.write_text("{}")
    with pytest.raises(ImportError, match="pip install tokenizers"):
        HFTokenizer(path)


def test_hf_tokenizer_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        get_tokenizer(str(tmp_path / "nope" / "tokenizer.json"))
