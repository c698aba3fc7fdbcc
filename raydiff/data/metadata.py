"""Read a dataset's metadata file into plain row dicts, and pick the rows a run trains and evaluates on.

DiffSynth's `UnifiedDataset` metadata: `.json` (a list of objects), `.jsonl` or `.csv`
(we add `.parquet`), minimal columns `image,prompt`. Only `data_file_keys` name files;
every other column passes through untouched. Rows we cannot train on come back as
`BadSample`s so the caller decides whether to skip them or fail (`SampleError`).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import math
import os
import posixpath
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from raydiff.config import DataConfig

log = logging.getLogger(__name__)
ESCAPE_REASON = "path escapes base_path; set data.allow_outside_base: true to allow"
_BOM = b"\xef\xbb\xbf"  # Excel and Notepad prepend it to UTF-8 files
_URL = re.compile(r"^(?!file://)[A-Za-z][A-Za-z0-9+.-]*://")  # file:// stays local: it can escape


class _Reason(str):
    """Why a record failed to parse; stands in for the record until it becomes a BadSample."""


@dataclass(frozen=True)
class BadSample:
    """One metadata row we cannot train on. `row` is the 0-based record index in the file."""

    row: int
    file: str | None
    reason: str

    def __str__(self) -> str:
        if self.row >= 1 << 32:  # a sharded sample's id (shard_id << 32 | record): its reason names both
            return f"file {self.file!r}: {self.reason}" if self.file is not None else self.reason
        row = f"regularization row {reg_id(self.row)}" if self.row < 0 else f"row {self.row}"
        where = row if self.file is None else f"{row}, file {self.file!r}"
        return f"{where}: {self.reason}"


class SampleError(ValueError):
    """A bad sample, raised when skipping bad samples is off. `.bad` holds the details."""

    def __init__(self, bad: BadSample):
        super().__init__(str(bad))
        self.bad = bad

    def __reduce__(self):
        # Ray pickles exceptions across processes; the default reduce would call
        # SampleError(message) and lose `.bad`.
        return (type(self), (self.bad,))


class MetadataError(ValueError):
    """The metadata file as a whole is unusable (unreadable, unknown format, missing column)."""


def reg_id(index: int) -> int:
    """`_row` of a `data.regularization` sample from its record index in the regularization file, and back:
    -1 - index. Training ids are never negative (metadata record indices; sharded ids `shard_id << 32 |
    record` fill all 63 bits), so a batch says by its ids which samples are regularization ones."""
    return -1 - index


def is_regularization(rows) -> np.ndarray:
    """(B,) bool: which `_row` ids are regularization samples."""
    return np.asarray(rows, dtype=np.int64) < 0


def is_url(path: str) -> bool:
    """True for remote paths such as `s3://bucket/x.png` (not checked or resolved locally)."""
    return bool(_URL.match(path))


def read_metadata(
    metadata_path: str,
    *,
    base_path: str,
    data_file_keys: Sequence[str],
    required_columns: Sequence[str] = ("prompt",),
    allow_outside_base: bool = False,
    max_paths: dict[str, int] | None = None,
) -> tuple[list[dict], list[BadSample]]:
    """Read `metadata_path` (.csv, .json, .jsonl, .parquet) and resolve its file columns.

    Returns `(rows, bad)`. Each row is a dict of every column plus `"_row"` (0-based
    record index in the file); each `data_file_keys` column holds an absolute local path
    (or the URL, untouched), and `"prompt"` is always a string. Rows with undecodable
    text, unsafe or missing files land in `bad` instead, as do rows listing more paths in a column than
    `max_paths` ({column: most}; 1: a path, never a list) allows. Raises MetadataError for whole-file problems.
    """
    records, columns = _read_records(metadata_path)
    for col in [*required_columns, *data_file_keys]:
        if col not in columns:
            raise MetadataError(
                f"{metadata_path}: missing column {col!r}; columns found: {sorted(columns)}"
            )
    rows: list[dict] = []
    bad: list[BadSample] = []
    for index, record in enumerate(records):
        result = _check_row(index, record, base_path, data_file_keys, allow_outside_base, max_paths or {})
        (bad if isinstance(result, BadSample) else rows).append(result)
    return rows, bad


def _read_records(path: str) -> tuple[list[Any], set[str]]:
    """Parse the file into records (dicts, or a `_Reason` for a row that failed) and columns."""
    ext = os.path.splitext(path)[1].lower()
    if ext not in (".csv", ".json", ".jsonl", ".parquet"):
        raise MetadataError(f"{path}: unknown metadata format {ext!r}; use .csv, .json, .jsonl or .parquet")
    try:
        if ext == ".parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(path)
            return table.to_pylist(), set(table.column_names)
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise MetadataError(f"{path}: cannot read metadata: {e}") from e
    except Exception as e:  # pyarrow raises ArrowInvalid etc. for corrupt files
        raise MetadataError(f"{path}: cannot read parquet metadata: {e}") from e
    return {".csv": _read_csv, ".json": _read_json, ".jsonl": _read_jsonl}[ext](path, data)


def _read_csv(path: str, data: bytes) -> tuple[list[Any], set[str]]:
    # surrogateescape keeps one bad byte from failing the whole file; the row holding it
    # is found afterwards by its surrogate characters. utf-8-sig drops Excel's BOM.
    text = data.decode("utf-8-sig", errors="surrogateescape")
    try:
        reader = csv.DictReader(io.StringIO(text, newline=""))
        header = reader.fieldnames or []
        if any(_has_surrogates(h) for h in header):
            raise MetadataError(f"{path}: header is not valid UTF-8")
        records: list[Any] = []
        for row in reader:
            if None in row:  # DictReader files surplus fields under the key None
                records.append(_Reason(f"row has {len(header) + len(row[None])} fields, header has {len(header)}"))
            elif any(isinstance(v, str) and _has_surrogates(v) for v in row.values()):
                records.append(_Reason("text is not valid UTF-8"))
            else:
                records.append(row)
    except csv.Error as e:
        raise MetadataError(f"{path}: malformed CSV: {e}") from e
    return records, set(header)


def _read_json(path: str, data: bytes) -> tuple[list[Any], set[str]]:
    bom = len(_BOM) if data.startswith(_BOM) else 0
    try:
        text = data[bom:].decode("utf-8")
    except UnicodeDecodeError as e:
        raise MetadataError(f"{path}: not valid UTF-8 at byte offset {bom + e.start}") from e
    try:
        items = json.loads(text)
    except json.JSONDecodeError as e:
        raise MetadataError(f"{path}: invalid JSON: {e}") from e
    if not isinstance(items, list):
        raise MetadataError(f"{path}: expected a JSON list of objects, got {type(items).__name__}")
    return _objects(items)


def _read_jsonl(path: str, data: bytes) -> tuple[list[Any], set[str]]:
    items: list[Any] = []
    for line in data.removeprefix(_BOM).splitlines():
        if not line.strip():
            continue  # blank lines are not records, so they do not count as rows
        try:
            items.append(json.loads(line.decode("utf-8")))
        except UnicodeDecodeError:
            items.append(_Reason("text is not valid UTF-8"))
        except json.JSONDecodeError as e:
            items.append(_Reason(f"invalid JSON: {e}"))
    return _objects(items)


def _objects(items: list[Any]) -> tuple[list[Any], set[str]]:
    """Keep dicts and reasons, turn other values into reasons; columns are the union of keys."""
    records: list[Any] = []
    columns: set[str] = set()
    for item in items:
        if isinstance(item, dict):
            columns.update(item)
        elif not isinstance(item, _Reason):
            item = _Reason(f"row is not a JSON object but {type(item).__name__}")
        records.append(item)
    return records, columns


def _check_row(
    index: int, record: Any, base_path: str, keys: Sequence[str], allow_outside_base: bool, max_paths: dict[str, int]
) -> dict | BadSample:
    if isinstance(record, _Reason):
        return BadSample(index, None, str(record))
    row = dict(record)
    row["_row"] = index
    prompt = row.get("prompt")
    if isinstance(prompt, bytes):
        try:
            prompt = prompt.decode("utf-8")
        except UnicodeDecodeError:
            return BadSample(index, None, "prompt is not valid UTF-8")
    if prompt is None or (isinstance(prompt, float) and math.isnan(prompt)):
        prompt = ""  # empty captions are legitimate (unconditional training, caption dropout)
    row["prompt"] = prompt if isinstance(prompt, str) else str(prompt)
    for key in keys:
        value = row.get(key)
        # A list of paths (json, jsonl, parquet) is checked path by path: VACE's reference images.
        values = list(value) if isinstance(value, (list, tuple)) and value else [value]
        if key in max_paths and (isinstance(value, (list, tuple)) and max_paths[key] == 1 or
                                 len(values) > max_paths[key]):
            most = "one path, not a list" if max_paths[key] == 1 else f"at most {max_paths[key]} paths"
            return BadSample(index, None, f"column {key!r} takes {most}; got {value!r}")
        resolved = [_check_path(index, key, v, base_path, allow_outside_base) for v in values]
        if bad := next((r for r in resolved if isinstance(r, BadSample)), None):
            return bad
        row[key] = resolved if isinstance(value, (list, tuple)) else resolved[0]
    return row


def _check_path(index: int, key: str, value: Any, base_path: str, allow_outside_base: bool) -> str | BadSample:
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            return BadSample(index, None, f"column {key!r} is not valid UTF-8")
    if value is None or (isinstance(value, float) and math.isnan(value)) or value in ("", []):
        return BadSample(index, None, f"empty value in column {key!r}")
    if not isinstance(value, str):
        return BadSample(index, str(value), f"column {key!r} must be a path string (or a list of them)")
    resolved = resolve_path(value, base_path, allow_outside_base)
    if resolved is None:
        return BadSample(index, value, ESCAPE_REASON)
    if not is_url(resolved) and not os.path.exists(resolved):
        return BadSample(index, value, f"file not found (column {key!r})")
    return resolved


def resolve_path(value: str, base_path: str, allow_outside_base: bool = False) -> str | None:
    """Join `value` onto `base_path`; None if it escapes `base_path` and that is not allowed.

    Local paths come back absolute and normalised; URLs stay URLs. Symlinks are resolved
    for the escape check only, so a link inside the dataset pointing elsewhere counts as
    escaping (a shared dataset must not read arbitrary files of the worker).
    """
    if is_url(value):
        return value
    if is_url(base_path):
        rel = posixpath.normpath(value)
        if not allow_outside_base and (value.startswith("/") or rel == ".." or rel.startswith("../")):
            return None
        return base_path.rstrip("/") + "/" + rel
    joined = os.path.abspath(os.path.join(base_path, value))  # an absolute value wins the join
    if allow_outside_base:
        return joined
    if os.path.isabs(value):
        return None
    base_real = os.path.realpath(base_path)
    if os.path.commonpath([base_real, os.path.realpath(joined)]) != base_real:
        return None
    return joined


# --- the rows a run trains on ----------------------------------------------------------------

def read_rows(cfg: DataConfig, metadata_path: str | None = None, repeat: int | None = None,
              max_paths: dict[str, int] | None = None) -> tuple[list[dict], list[BadSample]]:
    """Metadata rows (repeated `cfg.repeat` times) and the rows refused before decoding.
    With `skip_bad_samples: false` the first refused row raises `SampleError`. `max_paths`: as `read_metadata`."""
    metadata_path = metadata_path or cfg.metadata_path
    rows, bad = read_metadata(metadata_path, base_path=cfg.base_path, data_file_keys=cfg.data_file_keys,
                              allow_outside_base=cfg.allow_outside_base, max_paths=max_paths)
    if bad and not cfg.skip_bad_samples:
        first, more = bad[0], len(bad) - 1
        hint = f" ({more} more bad rows)" if more else ""
        reason = f"{first.reason}{hint}; data.skip_bad_samples: true skips them"
        raise SampleError(BadSample(first.row, first.file, reason))
    for b in bad:
        log.warning("skipping %s", b)
    keep = ["prompt", "_row", *cfg.data_file_keys]
    rows = [{k: r[k] for k in keep} for r in rows] * (cfg.repeat if repeat is None else repeat)
    if not rows:
        raise ValueError(f"{metadata_path}: no usable samples")
    return rows, bad


def family_max_paths(cfg) -> dict[str, int]:
    """{column: the most paths a row may list} for `cfg.model.family` (an edit family's sources)."""
    from raydiff.registry import data_keys

    return dict(data_keys(cfg.model.family).max_paths)


def train_and_eval_rows(data: DataConfig, eval_cfg, max_paths: dict[str, int] | None = None
                        ) -> tuple[list[dict] | None, list[dict], list[BadSample]]:
    """(training rows, eval rows, bad rows). Eval rows come from `eval.metadata_path`, or are the last
    `eval.holdout` metadata rows, which then never reach training. Sharded data has no training rows
    here (None): the workers stream them. `max_paths`: the family's (`DataKeys.max_paths`)."""
    if data.sharded:
        if not eval_cfg.metadata_path:
            return None, [], []
        held, bad_eval = read_rows(data, eval_cfg.metadata_path, repeat=1, max_paths=max_paths)
        return None, held, bad_eval
    if eval_cfg.metadata_path:
        train, bad = read_rows(data, max_paths=max_paths)
        held, bad_eval = read_rows(data, eval_cfg.metadata_path, repeat=1, max_paths=max_paths)
        bad += bad_eval
    else:
        rows, bad = read_rows(data, repeat=1, max_paths=max_paths)
        if eval_cfg.holdout >= len(rows):
            raise ValueError(f"eval.holdout {eval_cfg.holdout} leaves no training rows out of {len(rows)}")
        cut = len(rows) - eval_cfg.holdout
        train, held = rows[:cut] * data.repeat, rows[cut:]
    if data.regularization is not None:
        reg, bad_reg = regularization_rows(data, len(train))
        train, bad = train + reg, bad + bad_reg
    return train, held, bad


def regularization_rows(data: DataConfig, n_train: int) -> tuple[list[dict], list[BadSample]]:
    """`data.regularization`'s rows, copied so that they make up its `ratio` of an epoch's samples:
    round(ratio / (1 - ratio) x n_train) copies, spread evenly over its rows (the remainder to rows picked
    by a fixed hash, so every run picks the same ones). Their `_row` ids are `reg_id(record index)`."""
    reg = data.regularization
    cfg = data.model_copy(update={"metadata_path": reg.metadata_path, "base_path": reg.base_path,
                                  "regularization": None})
    try:
        rows, bad = read_rows(cfg, repeat=1)
    except SampleError as err:
        raise SampleError(BadSample(reg_id(err.bad.row), err.bad.file, err.bad.reason)) from None
    total = round(reg.ratio / (1 - reg.ratio) * n_train)
    each, extra = divmod(total, len(rows))
    lucky = set(sorted(range(len(rows)), key=lambda i: hashlib.blake2b(b"reg%d" % i).digest())[:extra])
    out = [{**r, "_row": reg_id(r["_row"])} for i, r in enumerate(rows) for _ in range(each + (i in lucky))]
    bad = [BadSample(reg_id(b.row), b.file, b.reason) for b in bad]
    return out, bad


def _has_surrogates(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False
