"""Per-image metadata (CSV or JSON) joined to the table by file name; tag columns.

``read_metadata(path_or_bytes, key)``
    a CSV, TSV, JSON (a list of objects, or ``{name: {...}}``) or JSON Lines file, as a
    DataFrame with the ``key`` column as text. Problems that do not stop the read
    (duplicate keys: the first row wins; empty keys: dropped) are listed in
    ``df.attrs["problems"]``.

``join_metadata(df, meta, key)``
    adds every metadata column to the table without ever dropping or reordering rows. A
    row's ``path`` matches a key equal to the path, a key that ends with ``/<path>``
    (absolute paths from another machine), or a key that is just the file name. Columns
    that clash with schema or existing columns get a ``meta_`` prefix. Returns the table
    and a :class:`JoinReport`.

``tag_values(series)`` / ``rows_with_tag(series, value)``
    a column of ``"#beach #sunset"`` or ``"beach, sunset"`` split into values with the
    number of images per value, and the mask of rows carrying one value.
"""

from __future__ import annotations

import io
import json
import os
import posixpath
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from explorer._checks import check_int
from explorer.table import COLUMNS

__all__ = [
    "read_metadata",
    "join_metadata",
    "JoinReport",
    "tag_values",
    "rows_with_tag",
    "split_tags",
    "looks_like_tags",
    "normalize_key",
    "MetadataTooLarge",
    "MAX_BYTES",
    "MAX_ROWS",
    "MAX_LINE",
    "MAX_KEY",
]

#: prefix given to metadata columns whose names clash with the table's
CLASH_PREFIX = "meta_"
#: default caps on what :func:`read_metadata` reads, from a file or an upload alike
MAX_BYTES = 512 * 1024 * 1024
#: rows (10M images, with room for the metadata of images not in the table)
MAX_ROWS = 20_000_000
#: characters of one line of a CSV, TSV or JSON Lines file
MAX_LINE = 1024 * 1024
#: characters of one key value (a file path; PATH_MAX is 4096 on Linux)
MAX_KEY = 8192
_MAX_BYTES = MAX_BYTES  # the old private name
_DOT_SLASHES = re.compile(r"(?:\./)+")


class MetadataTooLarge(ValueError):
    """Metadata over one of the caps (bytes, rows, line length, key length)."""


def _line_stats(data: bytes, chunk: int = 16 << 20) -> tuple[int, int]:
    """(number of lines, longest line in bytes) of ``data``, in bounded memory."""
    lines, longest = 0, 0
    arr = np.frombuffer(data, dtype=np.uint8)
    carry = 0  # bytes of the current line before this chunk
    for lo in range(0, len(arr), chunk):
        nl = np.flatnonzero(arr[lo:lo + chunk] == 10)
        if len(nl):
            first = carry + int(nl[0])
            gaps = np.diff(nl) - 1 if len(nl) > 1 else np.zeros(0, dtype=np.int64)
            longest = max(longest, first, int(gaps.max()) if len(gaps) else 0)
            lines += len(nl)
            carry = min(len(arr), lo + chunk) - lo - int(nl[-1]) - 1
        else:
            carry += min(chunk, len(arr) - lo)
        longest = max(longest, carry)
    if carry:
        lines += 1
    return lines, longest


# ---------------------------------------------------------------------- reading
def normalize_key(value) -> str:
    """A file name or path as the join compares it: trimmed, POSIX slashes, no leading ``./``."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return ""
    s = str(value).strip().replace("\\", "/")
    if s.startswith("./"):  # one regex pass: a key of many "./" costs linear time
        s = s[_DOT_SLASHES.match(s).end():]
    return s


def _decode(data: bytes) -> tuple[str, list[str]]:
    try:
        return data.decode("utf-8-sig"), []
    except UnicodeDecodeError:
        return data.decode("cp1252", errors="replace"), [
            "the file is not UTF-8; read it as Windows-1252 (check accented characters)"
        ]


def _flatten(value):
    """JSON values to table cells: lists become 'a, b', objects become JSON text."""
    if isinstance(value, list):
        return ", ".join(str(_flatten(v)) for v in value if v is not None)
    if isinstance(value, dict):
        return json.dumps(value, ensure_ascii=False, sort_keys=True)
    return value


def _from_json(text: str, key: str | None, jsonl: bool) -> pd.DataFrame:
    key = key or "file"  # the column that holds the outer names of {name: {...}}
    if jsonl:
        rows = []
        for i, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except ValueError as exc:
                raise ValueError(f"line {i} is not valid JSON: {exc}") from exc
        obj = rows
    else:
        try:
            obj = json.loads(text)
        except ValueError as exc:
            raise ValueError(f"not valid JSON: {exc}") from exc
    if isinstance(obj, dict):
        # {name: {...}}: the outer keys are the file names
        rows = []
        for name, rec in obj.items():
            if not isinstance(rec, dict):
                raise ValueError(
                    "a JSON object must map each file name to an object of fields; "
                    f"{name!r} maps to {type(rec).__name__}"
                )
            rows.append({key: name, **{k: v for k, v in rec.items() if k != key}})
        obj = rows
    if not isinstance(obj, list):
        raise ValueError("JSON metadata must be a list of objects or {file name: {...}}")
    bad = [i for i, r in enumerate(obj) if not isinstance(r, dict)]
    if bad:
        raise ValueError(f"JSON item {bad[0]} is not an object ({len(bad)} such item(s))")
    rows = [{str(k): _flatten(v) for k, v in r.items()} for r in obj]
    return pd.DataFrame(rows)


def _sniff_separator(text: str) -> str:
    """The most frequent of , ; tab | on the header line (default ",")."""
    first = text.lstrip("\r\n").split("\n", 1)[0]
    counts = {sep: first.count(sep) for sep in (",", ";", "\t", "|")}
    best = max(counts, key=lambda s: counts[s])
    return best if counts[best] else ","


def _from_csv(text: str, sep: str | None) -> pd.DataFrame:
    if not text.strip():
        raise ValueError("the metadata file is empty")
    if sep is None:
        sep = _sniff_separator(text)
    try:
        return pd.read_csv(io.StringIO(text), sep=sep, engine="c", dtype=str,
                           keep_default_na=False, na_values=[""], skipinitialspace=True)
    except pd.errors.EmptyDataError:
        raise ValueError("the metadata file is empty") from None
    except pd.errors.ParserError as exc:
        raise ValueError(f"not a readable CSV: {exc}") from exc


def _infer_numbers(df: pd.DataFrame, key: str) -> pd.DataFrame:
    """Columns whose every non-empty value is a number become numeric (so they colour as such)."""
    for col in df.columns:
        if col == key or pd.api.types.is_numeric_dtype(df[col]) or \
                pd.api.types.is_bool_dtype(df[col]):
            continue
        vals = df[col]
        present = vals.notna() & (vals.astype(str).str.strip() != "")
        if not present.any():
            continue
        num = pd.to_numeric(vals.where(present), errors="coerce")
        if num[present].notna().all():
            df[col] = num
    return df


#: column names tried, in order, when no key is given
KEY_CANDIDATES = ("path", "file", "filename", "file_name", "image", "name")


def read_metadata(path_or_bytes, key: str | None, *, fmt: str | None = None,
                  max_bytes: int = MAX_BYTES, max_rows: int = MAX_ROWS,
                  max_line: int = MAX_LINE, max_key: int = MAX_KEY) -> pd.DataFrame:
    """Read per-image metadata from a file path or the bytes of an upload.

    ``fmt`` (``"csv"``, ``"tsv"``, ``"json"``, ``"jsonl"``) defaults to the file's suffix,
    or for bytes to JSON when the text starts with ``[`` or ``{`` and CSV otherwise.
    The ``key`` column holds file names or relative paths; it is returned as text,
    normalised by :func:`normalize_key`. Columns whose values are all numbers are numeric;
    JSON lists become ``"a, b"`` (a tag column).

    ``key=None`` picks the first of :data:`KEY_CANDIDATES` that is a column (any case);
    the chosen name is in ``df.attrs["key"]``.

    Caps, the same for a file and for the bytes of an upload: ``max_bytes`` in all,
    ``max_rows`` rows, ``max_line`` characters per line (CSV, TSV, JSON Lines) and
    ``max_key`` characters per key value; over a cap raises :class:`MetadataTooLarge` (a
    ``ValueError``) naming the cap, before the data is parsed where it can be.

    Raises ``ValueError`` with a clear message for: a missing file, unreadable CSV/JSON, a
    missing ``key`` column (naming the columns there are), or no rows.
    """
    for cap, v in (("max_bytes", max_bytes), ("max_rows", max_rows), ("max_line", max_line),
                   ("max_key", max_key)):
        check_int(cap, v, 1)
    if key is not None and (not isinstance(key, str) or not key.strip()):
        raise ValueError(f"key must be the name of the column with file names, got {key!r}")
    name = "upload"
    if isinstance(path_or_bytes, (bytes, bytearray, memoryview)):
        if len(path_or_bytes) > max_bytes:
            raise MetadataTooLarge(f"the upload is {len(path_or_bytes):,} bytes, more than the "
                                   f"limit of {max_bytes:,}; not read")
        data = bytes(path_or_bytes)
    elif isinstance(path_or_bytes, (str, os.PathLike)):
        p = Path(path_or_bytes)
        name = str(p)
        if not p.is_file():
            raise ValueError(f"metadata file not found: {p}")
        if p.stat().st_size > max_bytes:
            raise MetadataTooLarge(f"{p} is {p.stat().st_size:,} bytes, more than the limit "
                                   f"of {max_bytes:,}; not read")
        with open(p, "rb") as fh:  # never more than the cap, even if it grew meanwhile
            data = fh.read(max_bytes + 1)
        if len(data) > max_bytes:
            raise MetadataTooLarge(f"{p} is more than the limit of {max_bytes:,} bytes; not read")
        if fmt is None:
            suffix = p.suffix.lower().lstrip(".")
            fmt = {"csv": "csv", "tsv": "tsv", "tab": "tsv", "txt": "csv", "json": "json",
                   "jsonl": "jsonl", "ndjson": "jsonl"}.get(suffix)
    else:
        raise ValueError(
            f"read_metadata takes a path or bytes, got {type(path_or_bytes).__name__}"
        )
    if fmt is None:
        head = data[:4096].lstrip(b"\xef\xbb\xbf \t\r\n")[:1]
        fmt = "json" if head in (b"[", b"{") else "csv"
        if fmt == "json" and head == b"{" and b"\n{" in data.rstrip():
            fmt = "jsonl"
    fmt = fmt.lower()
    n_lines, longest = _line_stats(data)
    if fmt != "json" and longest > max_line:
        raise MetadataTooLarge(f"{name}: a line is {longest:,} bytes long, more than the limit "
                               f"of {max_line:,}; not read")
    if n_lines > max_rows + 1:
        raise MetadataTooLarge(f"{name}: {n_lines - 1:,} rows, more than the limit of "
                               f"{max_rows:,}; not read")
    text, problems = _decode(data)
    del data
    try:
        if fmt in ("json", "jsonl"):
            meta = _from_json(text, key, jsonl=(fmt == "jsonl"))
        elif fmt in ("csv", "tsv"):
            meta = _from_csv(text, "\t" if fmt == "tsv" else None)
        else:
            raise ValueError(f"unknown metadata format {fmt!r}; use csv, tsv, json or jsonl")
    except ValueError as exc:
        raise ValueError(f"{name}: {exc}") from exc
    meta.columns = [str(c).strip() for c in meta.columns]
    if key is None:
        lower = {str(c).lower(): c for c in meta.columns}
        key = next((lower[c] for c in KEY_CANDIDATES if c in lower), None)
        if key is None:
            cols = ", ".join(repr(c) for c in list(meta.columns)[:20]) or "none"
            raise ValueError(
                f"{name}: no file-name column found (tried {', '.join(KEY_CANDIDATES)}); "
                f"pass the key column; columns: {cols}"
            )
    if key not in meta.columns:
        cols = ", ".join(repr(c) for c in list(meta.columns)[:20]) or "none"
        raise ValueError(f"{name}: no column {key!r} to match images by; columns: {cols}")
    if len(meta) == 0:
        raise ValueError(f"{name}: the metadata has no rows")
    if len(meta) > max_rows:
        raise MetadataTooLarge(f"{name}: {len(meta):,} rows, more than the limit of "
                               f"{max_rows:,}")
    key_len = meta[key].astype(str).str.len()
    if len(key_len) and int(key_len.max()) > max_key:
        at = int(key_len.to_numpy().argmax())
        raise MetadataTooLarge(f"{name}: the {key!r} value of row {at + 1} is "
                               f"{int(key_len.iloc[at]):,} characters long, more than the "
                               f"limit of {max_key:,} for a file path")
    dup_cols = [c for c, n in Counter(meta.columns).items() if n > 1]
    if dup_cols:
        raise ValueError(f"{name}: column name(s) used twice: {dup_cols}")
    meta[key] = meta[key].map(normalize_key)
    empty = meta[key] == ""
    if empty.any():
        problems.append(f"{int(empty.sum())} row(s) without a {key!r} value were dropped")
        meta = meta[~empty]
    dups = meta[key].duplicated(keep="first")
    if dups.any():
        examples = list(dict.fromkeys(meta.loc[dups, key]))[:3]
        problems.append(
            f"{int(dups.sum())} duplicate {key!r} value(s) (e.g. {examples}); "
            "the first row of each was kept"
        )
        meta = meta[~dups]
    meta = _infer_numbers(meta.reset_index(drop=True), key)
    meta.attrs["problems"] = problems
    meta.attrs["duplicates"] = int(dups.sum())
    meta.attrs["key"] = key
    return meta


# ---------------------------------------------------------------------- joining
@dataclass
class JoinReport:
    """What :func:`join_metadata` did."""

    n_rows: int
    matched: int
    by_path: int = 0
    by_suffix: int = 0
    by_name: int = 0
    unmatched_examples: list[str] = field(default_factory=list)
    unused: int = 0
    unused_examples: list[str] = field(default_factory=list)
    ambiguous: int = 0
    ambiguous_examples: list[str] = field(default_factory=list)
    columns: list[str] = field(default_factory=list)
    renamed: dict[str, str] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @property
    def unmatched(self) -> int:
        return self.n_rows - self.matched

    def to_dict(self) -> dict:
        """JSON-ready (for the run record)."""
        from dataclasses import asdict

        return {**asdict(self), "unmatched": self.unmatched, "summary": self.summary()}

    def summary(self) -> str:
        """One paragraph a person can read."""
        parts = [f"matched {self.matched} of {self.n_rows} images"]
        if self.unmatched:
            parts.append(f"{self.unmatched} without metadata (e.g. {self.unmatched_examples})")
        if self.unused:
            parts.append(f"{self.unused} metadata row(s) matched no image "
                         f"(e.g. {self.unused_examples})")
        if self.ambiguous:
            parts.append(f"{self.ambiguous} file name(s) appear in several folders and were "
                         f"matched by name to all of them (e.g. {self.ambiguous_examples})")
        if self.columns:
            parts.append(f"added column(s) {self.columns}")
        if self.renamed:
            parts.append("renamed " + ", ".join(f"{a!r} -> {b!r}" for a, b in self.renamed.items()))
        parts += self.problems
        return "; ".join(parts)


def _target_names(meta_cols, taken: set) -> dict[str, str]:
    out: dict[str, str] = {}
    used = set(taken)
    for c in meta_cols:
        name = c
        if name in used or name in COLUMNS:
            name = CLASH_PREFIX + c
            i = 2
            while name in used or name in COLUMNS:
                name = f"{CLASH_PREFIX}{c}_{i}"
                i += 1
        used.add(name)
        out[c] = name
    return out


def join_metadata(df: pd.DataFrame, meta: pd.DataFrame, key: str | None = None, *,
                  path_col: str = "path") -> tuple[pd.DataFrame, JoinReport]:
    """Add ``meta``'s columns to ``df`` by file name; never drops, adds or reorders rows.

    Each row's ``path`` is matched, in this order, to a key equal to the path, a key
    ending with ``"/" + path``, then a key equal to the file name. Unmatched rows get
    missing values. The ``key`` column (default: the one :func:`read_metadata` chose) is
    not added. Metadata columns named like a
    schema column or an existing column are renamed ``meta_<name>`` (listed in the
    report). ``df`` is not modified.
    """
    if path_col not in df.columns:
        raise ValueError(f"the table has no {path_col!r} column to join metadata by")
    if key is None:
        key = meta.attrs.get("key")
    if key not in meta.columns:
        raise ValueError(f"the metadata has no {key!r} column")
    meta = meta.copy()
    meta[key] = meta[key].map(normalize_key)
    meta = meta[meta[key] != ""].drop_duplicates(subset=key, keep="first")
    keys = meta[key].tolist()
    exact = {k: i for i, k in enumerate(keys)}
    paths = df[path_col].fillna("").astype(str).map(normalize_key).tolist()
    # a path of d components can only match a key's last d components: index each key's
    # suffixes up to the table's deepest path, found from the end (no split of the key),
    # so the cost is linear in keys x depth, whatever the keys hold (H2)
    depth = max((p.count("/") + 1 for p in paths if p), default=0)
    by_suffix: dict[str, int] = {}
    for i, k in enumerate(keys):
        end = len(k)
        for _ in range(depth):
            cut = k.rfind("/", 0, end)
            if cut < 0:
                break
            by_suffix.setdefault(k[cut + 1:], i)
            end = cut
    names = {k: i for i, k in enumerate(keys) if "/" not in k}

    basenames = [posixpath.basename(p) for p in paths]
    name_freq = Counter(basenames)
    rows = np.full(len(paths), -1, dtype=np.int64)
    report = JoinReport(n_rows=len(paths), matched=0, problems=list(meta.attrs.get("problems", [])))
    ambiguous = set()
    for r, (p, b) in enumerate(zip(paths, basenames)):
        if not p:
            continue
        if p in exact:
            rows[r] = exact[p]
            report.by_path += 1
        elif p in by_suffix:
            rows[r] = by_suffix[p]
            report.by_suffix += 1
        elif b in names:
            rows[r] = names[b]
            report.by_name += 1
            if name_freq[b] > 1:
                ambiguous.add(b)
    matched = rows >= 0
    report.matched = int(matched.sum())
    report.unmatched_examples = [p for p, m in zip(paths, matched) if not m][:3]
    used = set(rows[matched].tolist())
    unused = [k for i, k in enumerate(keys) if i not in used]
    report.unused = len(unused)
    report.unused_examples = unused[:3]
    report.ambiguous = len(ambiguous)
    report.ambiguous_examples = sorted(ambiguous)[:3]

    meta_cols = [c for c in meta.columns if c != key]
    targets = _target_names(meta_cols, set(df.columns))
    report.columns = [targets[c] for c in meta_cols]
    report.renamed = {c: t for c, t in targets.items() if c != t}
    out = df.copy()
    take = np.where(matched, rows, 0)
    for c in meta_cols:
        col = meta[c].reset_index(drop=True)
        vals = col.iloc[take].reset_index(drop=True) if len(col) else pd.Series([None] * len(df))
        vals = vals.where(pd.Series(matched), other=np.nan)
        vals.index = out.index
        out[targets[c]] = vals
    return out, report


# ---------------------------------------------------------------------- tags
_HASHTAG = re.compile(r"#([^\s#,;]+)")
_SEPARATORS = re.compile(r"[,;|]")


def split_tags(cell) -> list[str]:
    """The distinct tags in one cell, in order.

    ``"#beach #sunset"`` -> ``["beach", "sunset"]``; ``"beach, sunset"`` or
    ``"beach; sunset"`` or ``"beach|sunset"`` -> the same; a plain value is one tag;
    empty/missing -> ``[]``.
    """
    if cell is None or (isinstance(cell, float) and np.isnan(cell)):
        return []
    if isinstance(cell, (list, tuple, set)):
        items = [str(v).strip().lstrip("#").strip() for v in cell]
        return list(dict.fromkeys(v for v in items if v))
    s = str(cell).strip()
    if not s:
        return []
    out: list[str] = []
    for part in _SEPARATORS.split(s):
        part = part.strip()
        if not part:
            continue
        if "#" in part:
            found = _HASHTAG.findall(part)
            out.extend(found)
            rest = _HASHTAG.sub(" ", part).strip()
            if rest and not found:
                out.append(rest)
        else:
            out.append(part)
    return list(dict.fromkeys(t for t in out if t))


def tag_values(series) -> dict[str, int]:
    """Number of images (rows) per tag, most frequent first (ties by tag)."""
    c: Counter = Counter()
    for cell in series:
        c.update(split_tags(cell))
    return dict(sorted(c.items(), key=lambda kv: (-kv[1], kv[0])))


def rows_with_tag(series, value: str) -> np.ndarray:
    """Boolean mask of the rows whose cell carries the tag ``value`` (a leading ``#`` ignored)."""
    if not isinstance(value, str) or not value.strip().lstrip("#"):
        raise ValueError(f"value must be a non-empty tag, got {value!r}")
    v = value.strip().lstrip("#")
    try:  # each distinct cell split once (a column of 200,000 rows has few: 0.8 s -> ms)
        codes, cells = pd.factorize(pd.Series(series, dtype=object), use_na_sentinel=True)
    except TypeError:  # unhashable cells (lists): one by one
        return np.fromiter((v in split_tags(cell) for cell in series), dtype=bool,
                           count=len(series))
    has = np.fromiter((v in split_tags(cell) for cell in cells), dtype=bool, count=len(cells))
    return np.append(has, False)[codes]  # code -1 (missing): the appended False


def looks_like_tags(series, *, sample: int = 2000) -> bool:
    """Whether a text column holds several tags per cell (hashtags or separated lists)."""
    s = pd.Series(series)
    if pd.api.types.is_numeric_dtype(s) or pd.api.types.is_bool_dtype(s):
        return False
    vals = [v for v in s.head(sample) if isinstance(v, str) and v.strip()]
    if not vals:
        return False
    multi = sum(1 for v in vals if len(split_tags(v)) > 1 or v.lstrip().startswith("#"))
    return multi >= max(1, 0.2 * len(vals))
