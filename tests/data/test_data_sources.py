"""Document sources: books split layout, file formats, the spec factory, errors."""

import csv
import json
import lzma
import mmap
import pickle
import re

import numpy as np
import pytest

from mamba3_jax.data.sources import (
    ArrayRecordSource,
    BooksSource,
    JsonlSource,
    ParquetSource,
    TextFileSource,
    get_source,
    tinyshakespeare_source,
)


def _manifest_rows(data_dir, split):
    with open(data_dir / "books" / "manifest.tsv", newline="") as f:
        return [r for r in csv.DictReader(f, delimiter="\t") if r["split"] == split]


def test_books_valid_matches_manifest(data_dir, tmp_path):
    rows = _manifest_rows(data_dir, "valid")
    src = BooksSource("valid", data_dir, cache_dir=tmp_path)
    assert len(src) == len(rows) == 24
    assert src.pg_ids == [r["pg_id"] for r in rows]
    docs = [src[i] for i in range(len(src))]
    assert [len(d.encode("utf-8")) for d in docs] == [int(r["bytes"]) for r in rows]
    assert src.doc_num_bytes().tolist() == [int(r["bytes"]) for r in rows]
    assert all(d.endswith("\n") and "\x1e" not in d for d in docs)
    assert src[-1] == docs[-1]
    with pytest.raises(IndexError):
        src[len(src)]
    # The decompressed split was cached; a second source memory-maps it.
    cached = list(tmp_path.glob("books-valid-*.txt"))
    assert len(cached) == 1
    again = BooksSource("valid", data_dir, cache_dir=tmp_path)
    assert isinstance(src._data, bytes) and isinstance(again._data, mmap.mmap)
    assert again[3] == docs[3] and again[23] == docs[23]
    # Pickling drops the data and reloads it on first access.
    clone = pickle.loads(pickle.dumps(again))
    assert clone[5] == docs[5]


def test_books_partial_train(data_dir):
    rows = _manifest_rows(data_dir, "train")
    src = BooksSource("train", data_dir, max_docs=3, cache_dir=False)
    assert len(src) == 3
    assert [len(src[i].encode()) for i in range(3)] == [int(r["bytes"]) for r in rows[:3]]
    cut = BooksSource("train", data_dir, max_bytes=int(rows[0]["bytes"]) + 500, cache_dir=False)
    assert len(cut) == 2
    assert cut[0] == src[0] and cut[1] == src[1][: len(cut[1])]
    assert len(cut[1].encode()) == 500


def _write_books(root, books, lengths=None, split="valid"):
    (root / "books").mkdir(parents=True)
    data = "\x1e\n".join(books).encode()
    (root / "books" / f"{split}.txt.xz").write_bytes(lzma.compress(data))
    lengths = lengths or [len(b.encode()) for b in books]
    lines = ["split\tpg_id\tbytes\ttitle"]
    lines += [f"{split}\t{i}\t{n}\tbook {i}" for i, n in enumerate(lengths)]
    (root / "books" / "manifest.tsv").write_text("\n".join(lines) + "\n")


def test_books_synthetic_and_bad_manifest(tmp_path):
    books = ["first book\n", "second — book\n", "third\n"]
    _write_books(tmp_path / "ok", books)
    src = BooksSource("valid", tmp_path / "ok", cache_dir=False)
    assert [src[i] for i in range(3)] == books
    assert [len(b.encode()) for b in books] == [11, 16, 6]
    _write_books(tmp_path / "bad", books, lengths=[11, 17, 5])  # right total, wrong cut
    with pytest.raises(ValueError, match="manifest.tsv byte count of book 1.*separator"):
        BooksSource("valid", tmp_path / "bad", cache_dir=False)
    _write_books(tmp_path / "short", books, lengths=[11, 16, 4])  # wrong total
    with pytest.raises(ValueError, match="manifest.tsv .*add up to 35 bytes.*37 bytes"):
        BooksSource("valid", tmp_path / "short", cache_dir=False)


def test_books_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "books" / "test.txt.xz"))):
        BooksSource("test", tmp_path)
    with pytest.raises(ValueError, match="split"):
        BooksSource("dev", tmp_path)


def test_text_file_source(tmp_path):
    (tmp_path / "a.txt").write_text("doc one\n\n\n\ndoc two\n\n\n   \n\n\n")
    (tmp_path / "b.txt").write_text("only doc — ü")
    whole = TextFileSource(str(tmp_path / "*.txt"))
    assert len(whole) == 2 and whole[1] == "only doc — ü"
    split = TextFileSource([tmp_path / "a.txt", tmp_path / "b.txt"], doc_separator="\n\n\n")
    assert [split[i] for i in range(len(split))] == ["doc one", "\ndoc two", "only doc — ü"]
    rx = TextFileSource(tmp_path / "a.txt", doc_separator=re.compile(r"\n{3,}"))
    assert [rx[i] for i in range(len(rx))] == ["doc one", "doc two"]
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        TextFileSource(tmp_path / "missing.txt")
    with pytest.raises(FileNotFoundError, match="nomatch"):
        TextFileSource(str(tmp_path / "nomatch*.txt"))


def test_jsonl_source(tmp_path):
    (tmp_path / "a.jsonl").write_text(
        json.dumps({"text": "alpha", "id": 1}) + "\n\n" + json.dumps({"text": "βeta"}) + "\n"
    )
    (tmp_path / "b.jsonl").write_bytes(b'{"text": "gamma"}\r\n{"content": "x"}\r\n')
    src = JsonlSource([tmp_path / "a.jsonl", tmp_path / "b.jsonl"])
    assert len(src) == 4
    assert [src[i] for i in range(3)] == ["alpha", "βeta", "gamma"]
    with pytest.raises(KeyError, match="'text'"):
        src[3]
    other = JsonlSource(tmp_path / "b.jsonl", text_key="content")
    assert other[1] == "x"
    assert pickle.loads(pickle.dumps(src))[1] == "βeta"
    (tmp_path / "empty.jsonl").write_text("")
    assert len(JsonlSource(tmp_path / "empty.jsonl")) == 0


def test_parquet_source(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    texts = [f"document {i} " + "x" * i for i in range(25)]
    pq.write_table(
        pa.table({"text": texts[:17], "n": list(range(17))}),
        tmp_path / "a.parquet",
        row_group_size=5,
    )
    pq.write_table(pa.table({"text": texts[17:]}), tmp_path / "b.parquet")
    src = ParquetSource([tmp_path / "a.parquet", tmp_path / "b.parquet"], cached_row_groups=1)
    assert len(src) == 25
    order = np.random.default_rng(0).permutation(25)
    assert [src[int(i)] for i in order] == [texts[i] for i in order]
    assert pickle.loads(pickle.dumps(src))[20] == texts[20]
    with pytest.raises(KeyError, match="body"):
        ParquetSource(tmp_path / "a.parquet", text_column="body")


def test_arrayrecord_source(tmp_path):
    from array_record.python.array_record_module import ArrayRecordWriter

    raw, js = tmp_path / "raw.array_record", tmp_path / "json.array_record"
    w = ArrayRecordWriter(str(raw), "group_size:1")
    for t in ["one", "twö", "three"]:
        w.write(t.encode())
    w.close()
    w = ArrayRecordWriter(str(js), "group_size:1")
    w.write(json.dumps({"body": "from json"}).encode())
    w.close()
    src = ArrayRecordSource(raw)
    assert len(src) == 3 and [src[i] for i in range(3)] == ["one", "twö", "three"]
    assert ArrayRecordSource(js, text_key="body")[0] == "from json"
    spec = get_source({"kind": "arrayrecord", "paths": [str(raw)]})
    assert spec[2] == "three"


def test_tinyshakespeare_splits(data_dir):
    text = (data_dir / "tinyshakespeare" / "input.txt").read_text()
    parts = [tinyshakespeare_source(s, data_dir) for s in ("train", "valid", "test")]
    assert all(len(p) == 1 for p in parts)
    assert "".join(p[0] for p in parts) == text
    assert len(parts[0][0]) == int(0.9 * len(text))
    assert abs(len(parts[1][0]) - 0.05 * len(text)) <= 1


def test_get_source_kinds_and_errors(tmp_path, data_dir):
    (tmp_path / "a.txt").write_text("p1\n\n\np2")
    (tmp_path / "a.jsonl").write_text('{"t": "hi"}\n')
    assert len(get_source({"kind": "text", "paths": [str(tmp_path / "a.txt")]})) == 1
    assert (
        len(
            get_source(
                {"kind": "text", "paths": [str(tmp_path / "a.txt")], "doc_separator_regex": r"\n+"}
            )
        )
        == 2
    )
    assert (
        get_source({"kind": "jsonl", "paths": [str(tmp_path / "a.jsonl")], "text_key": "t"})[0]
        == "hi"
    )
    books = get_source({"kind": "books", "split": "valid", "max_docs": 2, "cache_dir": False})
    assert len(books) == 2
    shakes = get_source({"kind": "tinyshakespeare", "split": "test"})
    assert shakes[0].endswith("\n")
    try:
        from ml_collections import ConfigDict
    except ImportError:
        pass
    else:
        cfg = ConfigDict({"kind": "text", "paths": [str(tmp_path / "a.txt")]})
        assert get_source(cfg)[0] == "p1\n\n\np2"
    with pytest.raises(ValueError, match="books.*text.*jsonl"):
        get_source({"kind": "csv"})
    with pytest.raises(ValueError, match="kind"):
        get_source({"paths": []})
    with pytest.raises(FileNotFoundError, match="gone.jsonl"):
        get_source({"kind": "jsonl", "paths": [str(tmp_path / "gone.jsonl")]})
    with pytest.raises(FileNotFoundError, match="input.txt"):
        get_source({"kind": "tinyshakespeare", "data_dir": str(tmp_path)})
