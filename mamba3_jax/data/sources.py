"""Random-access document sources.

Every source is a grain ``RandomAccessDataSource``: ``len(source)`` documents and
``source[i]`` returns document ``i`` as a ``str``. Documents are the unit of
shuffling and sharding; the pipeline resets the model state at each document
start. Sources keep file handles out of their pickled state, so they can be sent
to grain worker processes.
"""

from __future__ import annotations

import collections
import csv
import glob
import hashlib
import json
import lzma
import mmap
import os
import re
import threading
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mamba3_jax.data.paths import default_cache_dir, default_data_dir

PathLike = str | os.PathLike
PathsLike = PathLike | Sequence[PathLike]

BOOK_SEPARATOR = b"\x1e\n"
BOOK_SPLITS = ("train", "valid", "test")


def _require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {str(path)!r}")
    return path


def expand_paths(paths: PathsLike) -> list[Path]:
    """A path, or a list of paths/globs -> sorted concrete file paths (missing -> error)."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    out: list[Path] = []
    for p in paths:
        p = os.fspath(p)
        if any(ch in p for ch in "*?["):
            matches = sorted(glob.glob(os.path.expanduser(p)))
            if not matches:
                raise FileNotFoundError(f"No files match the pattern {p!r}")
            out.extend(Path(m) for m in matches)
        else:
            out.append(_require_file(Path(p).expanduser(), "Data file"))
    if not out:
        raise ValueError("No input paths given")
    return out


class InMemorySource:
    """Documents held in a Python list (tests, small corpora, split views)."""

    def __init__(self, docs: Sequence[str]):
        self._docs = list(docs)

    def __len__(self) -> int:
        return len(self._docs)

    def __getitem__(self, index: int) -> str:
        return self._docs[index]

    def __repr__(self) -> str:
        return f"InMemorySource({len(self)} docs)"


# -------------------------------------------------------------------------- books


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _read_books_manifest(path: Path, split: str) -> list[dict[str, str]]:
    _require_file(path, "Books manifest")
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    missing = {"split", "pg_id", "bytes"} - set(rows[0] if rows else {})
    if missing:
        raise ValueError(f"{str(path)!r} lacks the columns {sorted(missing)}")
    return [r for r in rows if r["split"] == split]


class BooksSource:
    """Project Gutenberg books, one document per book.

    Reads ``<data_dir>/books/<split>.txt.xz`` (the books joined by ``"\\x1e\\n"``)
    and cuts it with ``books/manifest.tsv`` (per-book byte lengths, file order).
    The byte counts are checked against the decompressed file.

    Decompressing train takes ~2 s, so the decompressed split is cached in
    ``cache_dir`` (default ``default_cache_dir()``; ``False`` keeps it in memory
    only) under a name keyed by the sha256 of the ``.xz`` file, and memory-mapped
    on later runs.

    ``max_docs`` keeps only the first books; ``max_bytes`` keeps only the first
    ``max_bytes`` bytes of book text (the last book kept is cut short). With
    either limit and no cache only the needed prefix is decompressed.
    """

    def __init__(
        self,
        split: str = "train",
        data_dir: PathLike | None = None,
        *,
        max_docs: int | None = None,
        max_bytes: int | None = None,
        cache_dir: PathLike | bool | None = None,
    ):
        if split not in BOOK_SPLITS:
            raise ValueError(f"Unknown books split {split!r}; valid: {BOOK_SPLITS}")
        if max_docs is not None and max_docs < 1:
            raise ValueError(f"max_docs must be >= 1, got {max_docs}")
        if max_bytes is not None and max_bytes < 1:
            raise ValueError(f"max_bytes must be >= 1, got {max_bytes}")
        self.split = split
        self.data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
        self.books_dir = self.data_dir / "books"
        self.xz_path = _require_file(self.books_dir / f"{split}.txt.xz", "Books split file")
        rows = _read_books_manifest(self.books_dir / "manifest.tsv", split)
        if not rows:
            raise ValueError(f"manifest.tsv has no rows for split {split!r}")
        all_lengths = np.array([int(r["bytes"]) for r in rows], dtype=np.int64)
        # Byte offsets of every book of the split in the decompressed file.
        all_starts = np.concatenate([[0], np.cumsum(all_lengths + len(BOOK_SEPARATOR))[:-1]])
        self._full_length = int(all_lengths.sum() + len(BOOK_SEPARATOR) * (len(rows) - 1))

        n = len(rows) if max_docs is None else min(max_docs, len(rows))
        starts, ends = all_starts[:n], all_starts[:n] + all_lengths[:n]
        self._truncated_last = False
        if max_bytes is not None:
            text_before = np.concatenate([[0], np.cumsum(ends - starts)[:-1]])
            keep = int(np.searchsorted(text_before, max_bytes, side="left"))
            starts, ends = starts[:keep], ends[:keep].copy()
            over = int(text_before[keep - 1] + ends[-1] - starts[-1] - max_bytes)
            if over > 0:
                ends[-1] -= over
                self._truncated_last = True
            n = keep
        self._starts, self._ends = starts, ends
        self._all_starts, self._all_lengths = all_starts, all_lengths
        self._all_pg_ids = [r["pg_id"] for r in rows]
        self.pg_ids = [r["pg_id"] for r in rows[:n]]
        self.titles = [r.get("title", "") for r in rows[:n]]
        if cache_dir is None:
            cache_dir = default_cache_dir()
        self.cache_dir = None if cache_dir is False else Path(cache_dir)
        self._data: bytes | mmap.mmap | None = None
        self._load()

    @property
    def is_partial(self) -> bool:
        return len(self._starts) < len(self._all_starts) or self._truncated_last

    def _cache_path(self) -> Path | None:
        if self.cache_dir is None:
            return None
        return self.cache_dir / f"books-{self.split}-{_sha256_file(self.xz_path)[:20]}.txt"

    def _load(self) -> None:
        cache_path = self._cache_path()
        if cache_path is not None and cache_path.is_file():
            if cache_path.stat().st_size == self._full_length:
                with open(cache_path, "rb") as f:
                    self._data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
                self._check_layout(self._data, full=True)
                return
            warnings.warn(f"Ignoring cache file of the wrong size: {cache_path}", stacklevel=2)
        if self.is_partial and cache_path is None:
            needed = int(
                self._all_starts[len(self._starts) - 1] + self._all_lengths[len(self._starts) - 1]
            )
            needed = min(needed + len(BOOK_SEPARATOR), self._full_length)
            data = self._decompress(needed)
            if len(data) < needed:
                raise ValueError(
                    f"{str(self.xz_path)!r} decompresses to only {len(data)} bytes, but "
                    f"manifest.tsv needs at least {needed} bytes for the requested books"
                )
            self._check_layout(data, full=False)
            self._data = data
            return
        data = self._decompress()
        self._check_layout(data, full=True)
        self._data = data
        if cache_path is not None:
            self._write_cache(cache_path, data)

    def _decompress(self, size: int = -1) -> bytes:
        try:
            with lzma.open(self.xz_path, "rb") as f:
                return f.read(size)
        except (lzma.LZMAError, EOFError) as e:
            raise ValueError(f"{str(self.xz_path)!r} is not a valid .xz file ({e})") from None

    def _check_layout(self, data: bytes | mmap.mmap, *, full: bool) -> None:
        """Checks the manifest's byte counts against the decompressed text."""
        if full and len(data) != self._full_length:
            raise ValueError(
                f"manifest.tsv byte counts for split {self.split!r} add up to "
                f"{self._full_length} bytes ({len(self._all_lengths)} books + separators), but "
                f"{str(self.xz_path)!r} decompresses to {len(data)} bytes"
            )
        ends = self._all_starts + self._all_lengths
        count = len(ends) - 1 if full else len(self._starts)
        for i in range(count):
            end = int(ends[i])
            if end + 2 > len(data):
                break
            if data[end : end + 2] != BOOK_SEPARATOR:
                raise ValueError(
                    f"manifest.tsv byte count of book {i} (pg_id {self._all_pg_ids[i]}) of split "
                    f"{self.split!r} does not end at a book separator in {str(self.xz_path)!r}"
                )

    def _write_cache(self, path: Path, data: bytes) -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, path)
        except OSError as e:  # read-only home etc.: keep working from memory
            warnings.warn(f"Could not write books cache {path}: {e}", stacklevel=3)

    def __len__(self) -> int:
        return len(self._starts)

    def __getitem__(self, index: int) -> str:
        if self._data is None:
            self._load()
        index = range(len(self))[index]  # bounds check, negative indices
        raw = self._data[int(self._starts[index]) : int(self._ends[index])]
        last_cut = self._truncated_last and index == len(self) - 1
        return bytes(raw).decode("utf-8", errors="ignore" if last_cut else "strict")

    def doc_num_bytes(self) -> np.ndarray:
        """Bytes of each document (int64), as kept (after max_docs/max_bytes)."""
        return self._ends - self._starts

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_data"] = None  # reloaded (from the cache) in the receiving process
        return state

    def __repr__(self) -> str:
        return f"BooksSource({self.split!r}, {len(self)} books, data_dir={str(self.data_dir)!r})"


# ---------------------------------------------------------------------- text files


class TextFileSource:
    """Plain UTF-8 text files: one document per file, or split on a separator.

    ``doc_separator`` is a literal string (e.g. ``"\\n\\n\\n"``) or a compiled
    ``re.Pattern``. Documents that are empty or whitespace only are dropped.
    The text is read into memory at construction.
    """

    def __init__(
        self,
        paths: PathsLike,
        doc_separator: str | re.Pattern | None = None,
        *,
        encoding: str = "utf-8",
    ):
        self.paths = expand_paths(paths)
        docs: list[str] = []
        for path in self.paths:
            try:
                text = path.read_text(encoding=encoding)
            except UnicodeDecodeError as e:
                raise ValueError(f"{str(path)!r} is not {encoding} text: byte {e.start} is "
                                 f"{e.object[e.start:e.start + 1]!r} ({e.reason})") from None
            if doc_separator is None:
                pieces = [text]
            elif isinstance(doc_separator, re.Pattern):
                pieces = doc_separator.split(text)
            else:
                if not doc_separator:
                    raise ValueError("doc_separator must not be empty")
                pieces = text.split(doc_separator)
            docs.extend(p for p in pieces if p.strip())
        self._docs = docs

    def __len__(self) -> int:
        return len(self._docs)

    def __getitem__(self, index: int) -> str:
        return self._docs[index]

    def __repr__(self) -> str:
        return f"TextFileSource({len(self.paths)} files, {len(self)} docs)"


# --------------------------------------------------------------------------- jsonl


def _extract_text(obj: Any, key: str, where: str) -> str:
    if not isinstance(obj, Mapping) or key not in obj:
        keys = sorted(obj) if isinstance(obj, Mapping) else type(obj).__name__
        raise KeyError(f"{where}: no text field {key!r} (record has {keys})")
    text = obj[key]
    if not isinstance(text, str):
        raise TypeError(f"{where}: field {key!r} is {type(text).__name__}, not str")
    return text


class JsonlSource:
    """JSON-lines files; each non-blank line is one record, ``record[text_key]`` the text.

    Line offsets are indexed once (numpy over a memory map); records are parsed
    on access, so large files need little memory.
    """

    def __init__(self, paths: PathsLike, text_key: str = "text"):
        self.paths = expand_paths(paths)
        self.text_key = text_key
        file_ids, starts, ends = [], [], []
        for fid, path in enumerate(self.paths):
            data = self._map(path)
            arr = np.frombuffer(data, dtype=np.uint8)
            newlines = np.flatnonzero(arr == ord("\n"))
            s = np.concatenate([[0], newlines + 1])
            e = np.concatenate([newlines, [len(arr)]])
            # Drop blank lines: empty, or a lone "\r" (CRLF files).
            keep = e > s
            single = np.flatnonzero(e - s == 1)
            keep[single[arr[s[single]] == ord("\r")]] = False
            starts.append(s[keep])
            ends.append(e[keep])
            file_ids.append(np.full(int(keep.sum()), fid, dtype=np.int32))
            del arr
            if isinstance(data, mmap.mmap):
                data.close()
        self._file_ids = np.concatenate(file_ids)
        self._starts = np.concatenate(starts).astype(np.int64)
        self._ends = np.concatenate(ends).astype(np.int64)
        self._maps: list[mmap.mmap] | None = None

    @staticmethod
    def _map(path: Path) -> mmap.mmap | bytes:
        if path.stat().st_size == 0:
            return b""
        with open(path, "rb") as f:
            return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)

    def __len__(self) -> int:
        return len(self._starts)

    def __getitem__(self, index: int) -> str:
        index = range(len(self))[index]
        if self._maps is None:
            self._maps = [self._map(p) for p in self.paths]
        fid = int(self._file_ids[index])
        line = self._maps[fid][int(self._starts[index]) : int(self._ends[index])]
        where = f"{self.paths[fid]} record {index}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: invalid JSON ({e})") from e
        return _extract_text(obj, self.text_key, where)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_maps"] = None
        return state

    def __repr__(self) -> str:
        return f"JsonlSource({len(self.paths)} files, {len(self)} docs)"


# ------------------------------------------------------------------------- parquet


class ParquetSource:
    """Parquet files (pyarrow); ``text_column`` holds one document per row.

    Rows are read one row group at a time and the last few row groups are kept;
    shuffled access is fastest when row groups are small.
    """

    def __init__(self, paths: PathsLike, text_column: str = "text", *, cached_row_groups: int = 4):
        import pyarrow.parquet as pq

        self.paths = expand_paths(paths)
        self.text_column = text_column
        self._cached_row_groups = max(1, cached_row_groups)
        groups = []  # (file index, row group index, rows)
        for fid, path in enumerate(self.paths):
            pf = pq.ParquetFile(path)
            names = pf.schema_arrow.names
            if text_column not in names:
                raise KeyError(f"{str(path)!r} has no column {text_column!r} (columns: {names})")
            for rg in range(pf.metadata.num_row_groups):
                groups.append((fid, rg, pf.metadata.row_group(rg).num_rows))
        self._groups = groups
        self._group_ends = np.cumsum([g[2] for g in groups]).astype(np.int64)
        self._files: dict[int, Any] | None = None
        self._cache: collections.OrderedDict[int, list] = collections.OrderedDict()
        self._lock = threading.Lock()  # the pipeline may read from several threads

    def __len__(self) -> int:
        return int(self._group_ends[-1]) if len(self._group_ends) else 0

    def _row_group(self, g: int) -> list:
        with self._lock:
            return self._row_group_locked(g)

    def _row_group_locked(self, g: int) -> list:
        if g in self._cache:
            self._cache.move_to_end(g)
            return self._cache[g]
        import pyarrow.parquet as pq

        if self._files is None:
            self._files = {}
        fid, rg, _ = self._groups[g]
        if fid not in self._files:
            self._files[fid] = pq.ParquetFile(self.paths[fid])
        table = self._files[fid].read_row_group(rg, columns=[self.text_column])
        values = table.column(self.text_column).to_pylist()
        self._cache[g] = values
        while len(self._cache) > self._cached_row_groups:
            self._cache.popitem(last=False)
        return values

    def __getitem__(self, index: int) -> str:
        index = range(len(self))[index]
        g = int(np.searchsorted(self._group_ends, index, side="right"))
        first = int(self._group_ends[g - 1]) if g else 0
        text = self._row_group(g)[index - first]
        if not isinstance(text, str):
            raise TypeError(
                f"{self.paths[self._groups[g][0]]} row {index}: column {self.text_column!r} "
                f"is {type(text).__name__}, not str"
            )
        return text

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_files"] = None
        state["_cache"] = collections.OrderedDict()
        del state["_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"ParquetSource({len(self.paths)} files, {len(self)} docs)"


# -------------------------------------------------------------------- array_record


class ArrayRecordSource:
    """ArrayRecord files (grain's ``ArrayRecordDataSource``).

    Each record is UTF-8 text, or, with ``text_key``, a JSON object whose
    ``text_key`` field is the text.
    """

    def __init__(self, paths: PathsLike, text_key: str | None = None):
        import grain

        self.paths = expand_paths(paths)
        self.text_key = text_key
        self._records = grain.sources.ArrayRecordDataSource([str(p) for p in self.paths])

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> str:
        index = range(len(self))[index]
        raw = self._records[index]
        if self.text_key is None:
            return raw.decode("utf-8")
        return _extract_text(json.loads(raw), self.text_key, f"array_record record {index}")

    def __repr__(self) -> str:
        return f"ArrayRecordSource({len(self.paths)} files, {len(self)} docs)"


# --------------------------------------------------------------- tiny shakespeare

TINYSHAKESPEARE_FRACTIONS = {"train": (0.0, 0.9), "valid": (0.9, 0.95), "test": (0.95, 1.0)}


def tinyshakespeare_source(
    split: str = "train", data_dir: PathLike | None = None
) -> InMemorySource:
    """Tiny Shakespeare as ONE document per split: characters [0, 90%), [90, 95%), [95, 100%)."""
    if split not in TINYSHAKESPEARE_FRACTIONS:
        raise ValueError(f"Unknown split {split!r}; valid: {tuple(TINYSHAKESPEARE_FRACTIONS)}")
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    path = _require_file(data_dir / "tinyshakespeare" / "input.txt", "Tiny Shakespeare file")
    text = path.read_text(encoding="utf-8")
    lo, hi = TINYSHAKESPEARE_FRACTIONS[split]
    return InMemorySource([text[int(lo * len(text)) : int(hi * len(text))]])


# ------------------------------------------------------------------------- factory

SOURCE_KINDS = ("books", "text", "jsonl", "parquet", "arrayrecord", "tinyshakespeare")


def get_source(spec: Mapping[str, Any]):
    """Builds a source from a small dict / ``ConfigDict``.

    Examples::

      {"kind": "books", "split": "train", "max_docs": 10}
      {"kind": "text", "paths": ["a.txt"], "doc_separator": "\\n\\n\\n"}
      {"kind": "text", "paths": ["a.txt"], "doc_separator_regex": r"\\n{3,}"}
      {"kind": "jsonl", "paths": ["x.jsonl"], "text_key": "text"}
      {"kind": "parquet", "paths": ["x.parquet"], "text_column": "text"}
      {"kind": "arrayrecord", "paths": ["x.array_record"], "text_key": None}
      {"kind": "tinyshakespeare", "split": "valid"}
    """
    if hasattr(spec, "to_dict"):
        spec = spec.to_dict()
    spec = dict(spec)
    kind = spec.pop("kind", None)
    if kind is None:
        raise ValueError(f"Source spec needs a 'kind' (one of {SOURCE_KINDS}): {spec}")
    if kind == "books":
        return BooksSource(**spec)
    if kind == "tinyshakespeare":
        return tinyshakespeare_source(**spec)
    if kind == "text":
        regex = spec.pop("doc_separator_regex", None)
        if regex is not None:
            if spec.get("doc_separator") is not None:
                raise ValueError("Give doc_separator or doc_separator_regex, not both")
            spec["doc_separator"] = re.compile(regex)
        return TextFileSource(**spec)
    if kind == "jsonl":
        return JsonlSource(**spec)
    if kind == "parquet":
        return ParquetSource(**spec)
    if kind in ("arrayrecord", "array_record"):
        return ArrayRecordSource(**spec)
    raise ValueError(f"Unknown source kind {kind!r}; valid kinds: {SOURCE_KINDS}")
