"""Reading raw data into plain dict records, writing JSONL, and normalizing SFT records to chat messages.

`read_records(src)` accepts what users tend to have lying around and yields one dict per record:

    data/x.jsonl  data/x.json  data/x.txt  data/x.csv  data/x.tsv  data/x.parquet
    data/laws.db                      a SQLite file with exactly one table
    data/laws.db::articles            one table (or view) of a SQLite file
    "data/laws.db::SELECT article_text AS text FROM articles WHERE status = '现行有效'"
    data/hf_saved/                    a `datasets` save_to_disk folder (a DatasetDict gives every split)
    data/hf_saved::train              one split of a saved DatasetDict
    "data/raw/*.jsonl"                a glob (`**` recurses)
    data/raw/                         a folder: every supported file below it, in sorted order

Every record gets `_source` (where it came from: the file, or `file::table` / `folder::split`) and
`_line`, so that a problem can be reported as `file:line`:

- jsonl, txt: the line number (1-based; in paragraph mode, the paragraph's first line);
- csv, tsv: the line on which the row starts; the header is line 1, so the first data row is line 2;
- json: the item number in the top-level list or object (1-based), or the line number for JSON lines;
  an object whose values are all objects gives one record per value, its key kept in `_key`;
- parquet, SQLite, save_to_disk: the row number, counting from 1.

Text is read as bytes and decoded as UTF-8; undecodable bytes become U+FFFD, are counted per line in
`ReadStats.undecodable`, and the first such line of each file is reported. A malformed record (a jsonl
line that is not a JSON object, a csv row with the wrong number of fields, a record without the
requested text field) is reported as `file:line: reason`, counted in `ReadStats`, and skipped: the
rest of the file is still read. Problems that make a whole source unusable (missing file, empty glob,
unknown table, a text field that the source does not have at all) raise `UserError`.
"""

from __future__ import annotations

import csv
import datetime
import decimal
import glob
import json
import logging
import os
import re
import sqlite3
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from common.errors import UserError
from common.run import atomic_open

logger = logging.getLogger("domain_forge")

JSONL_EXTS = {".jsonl", ".ndjson"}
SQLITE_EXTS = {".db", ".sqlite", ".sqlite3"}
SUPPORTED_EXTS = JSONL_EXTS | SQLITE_EXTS | {".json", ".txt", ".csv", ".tsv", ".parquet"}

# How many leading records without the text field make us conclude the source has no such field.
FIELD_PROBE = 1000
# Per source, report this many malformed records one by one; the rest only as a count.
MAX_WARNINGS = 20
BATCH = 1000


@dataclass
class ReadStats:
    """Counts kept while reading. `read` counts the records yielded, `malformed` those skipped."""

    read: int = 0
    malformed: int = 0
    undecodable: int = 0  # lines/records in which undecodable bytes were replaced
    by_reason: dict[str, int] = field(default_factory=dict)

    def add_malformed(self, reason: str, n: int = 1) -> None:
        self.malformed += n
        self.by_reason[reason] = self.by_reason.get(reason, 0) + n

    def update(self, other: ReadStats) -> None:
        self.read += other.read
        self.undecodable += other.undecodable
        for reason, n in other.by_reason.items():
            self.by_reason[reason] = self.by_reason.get(reason, 0) + n
        self.malformed += other.malformed

    def as_dict(self) -> dict:
        return asdict(self)


class _Reporter:
    """Counts malformed records of one source and warns about the first few of them."""

    def __init__(self, label: str, stats: ReadStats, warn: Callable[[str], object]):
        self.label, self.stats, self.warn = label, stats, warn
        self.shown = self.hidden = 0

    def bad(self, line: int | str, reason: str, detail: str = "") -> None:
        self.stats.add_malformed(reason)
        if self.shown < MAX_WARNINGS:
            self.shown += 1
            self.warn(f"{self.label}:{line}: {reason}{' (' + detail + ')' if detail else ''}")
        else:
            self.hidden += 1

    def done(self) -> None:
        if self.hidden:
            self.warn(f"{self.label}: {self.hidden} more malformed records skipped (not shown)")
            self.hidden = 0


# ---------------------------------------------------------------------------------------------
# Resolving `src` into concrete sources, eagerly, so that a wrong path fails before any reading.


@dataclass
class _Source:
    kind: str  # "file", "sqlite", "hf"
    path: str
    selector: str | None = None  # sqlite table/query, or hf split


def _is_hf_folder(path: str) -> bool:
    def has(name):
        return os.path.isfile(os.path.join(path, name))

    return has("dataset_dict.json") or (has("dataset_info.json") and has("state.json"))


def _walk_folder(folder: str) -> list[_Source]:
    paths, skipped = [], []
    for root, dirs, files in os.walk(folder):
        if root != folder and _is_hf_folder(root):
            paths.append(root)
            dirs[:] = []
            continue
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in files:
            if name.startswith("."):
                continue
            path = os.path.join(root, name)
            (paths if Path(name).suffix.lower() in SUPPORTED_EXTS else skipped).append(path)
    if skipped:
        logger.info("%s: skipped %d file(s) of unsupported type, e.g. %s", folder, len(skipped), sorted(skipped)[0])
    if not paths:
        raise UserError(f"{folder}: no readable files (supported: {', '.join(sorted(SUPPORTED_EXTS))})")
    return [s for p in sorted(paths, key=lambda p: Path(p).parts) for s in _resolve_one(p, None)]


def _sqlite_connect(path: str) -> sqlite3.Connection:
    # Read-only: a query given on the command line must never change the user's database.
    return sqlite3.connect(Path(path).resolve().as_uri() + "?mode=ro", uri=True)


def _sqlite_names(path: str) -> tuple[list[str], list[str]]:
    try:
        con = _sqlite_connect(path)
        try:
            rows = con.execute(
                "SELECT type, name FROM sqlite_master WHERE type IN ('table', 'view') "
                "AND name NOT LIKE 'sqlite_%' ORDER BY name"
            ).fetchall()
        finally:
            con.close()
    except sqlite3.DatabaseError as e:
        raise UserError(f"{path}: cannot read as SQLite ({e})") from None
    return [n for t, n in rows if t == "table"], [n for t, n in rows if t == "view"]


def _is_query(selector: str) -> bool:
    return re.match(r"\s*(select|with)\b", selector, re.IGNORECASE) is not None


def _resolve_sqlite(path: str, selector: str | None) -> _Source:
    tables, views = _sqlite_names(path)
    if selector and _is_query(selector):
        return _Source("sqlite", path, selector)
    if selector is None:
        if len(tables) == 1:
            return _Source("sqlite", path, tables[0])
        raise UserError(
            f"{path}: has {len(tables)} tables; name one as {path}::TABLE or give a query as "
            f"{path}::SELECT ... (tables: {', '.join(tables + views) or 'none'})"
        )
    if selector not in tables + views:
        raise UserError(f"{path}: no table '{selector}' (tables: {', '.join(tables + views) or 'none'})")
    return _Source("sqlite", path, selector)


def _resolve_hf(path: str, split: str | None) -> list[_Source]:
    dict_file = os.path.join(path, "dataset_dict.json")
    if not os.path.isfile(dict_file):
        if split is not None:
            raise UserError(f"{path}: is a single saved dataset without splits; drop '::{split}'")
        return [_Source("hf", path)]
    with open(dict_file, encoding="utf-8") as f:
        splits = json.load(f).get("splits", [])
    if split is None:
        return [_Source("hf", path, s) for s in splits]
    if split not in splits:
        raise UserError(f"{path}: no split '{split}' (splits: {', '.join(splits)})")
    return [_Source("hf", path, split)]


def _resolve_one(path: str, selector: str | None) -> list[_Source]:
    if os.path.isdir(path):
        if _is_hf_folder(path):
            return _resolve_hf(path, selector)
        if selector is not None:
            raise UserError(f"{path}: '::{selector}' applies only to SQLite files and save_to_disk folders")
        return _walk_folder(path)
    ext = Path(path).suffix.lower()
    if ext in SQLITE_EXTS:
        return [_resolve_sqlite(path, selector)]
    if selector is not None:
        raise UserError(f"{path}: '::{selector}' applies only to SQLite files and save_to_disk folders")
    if ext not in SUPPORTED_EXTS:
        raise UserError(f"{path}: unsupported file type '{ext}' (supported: {', '.join(sorted(SUPPORTED_EXTS))})")
    return [_Source("file", path)]


def _resolve(src: str | os.PathLike) -> list[_Source]:
    src = os.fspath(src)
    path, selector = src, None
    if not os.path.exists(src) and "::" in src:
        path, selector = src.split("::", 1)
        selector = selector.strip() or None
    if os.path.exists(path):
        return _resolve_one(path, selector)
    if re.search(r"[*?[]", path):
        matches = sorted(glob.glob(path, recursive=True))
        if not matches:
            raise UserError(f"{path}: no files match this pattern")
        return [s for m in matches for s in _resolve_one(m, selector)]
    raise UserError(f"{path}: no such file or folder")


# ---------------------------------------------------------------------------------------------
# Readers. Each yields records that already carry `_source` and `_line`.


def _lines(path: str, stats: ReadStats, warn) -> Iterator[tuple[int, str]]:
    """(line number, decoded line with its line ending) for each line of a file, streamed."""
    warned = False
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                line = raw.decode("utf-8", errors="replace")
                stats.undecodable += 1
                if not warned:
                    warned = True
                    warn(f"{path}:{n}: bytes that are not UTF-8 replaced by U+FFFD (further lines only counted)")
            if n == 1 and line.startswith("\ufeff"):  # byte order mark written by some editors
                line = line[1:]
            yield n, line


def _json_lines(numbered: Iterable[tuple[int, str]], path: str, rep: _Reporter) -> Iterator[dict]:
    for n, line in numbered:
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            rep.bad(n, "invalid JSON", f"{e.msg} at column {e.colno}")
            continue
        if not isinstance(obj, dict):
            rep.bad(n, "not a JSON object", type(obj).__name__)
            continue
        obj["_source"], obj["_line"] = path, n
        yield obj


def _read_jsonl(path, stats, warn, rep, **_) -> Iterator[dict]:
    yield from _json_lines(_lines(path, stats, warn), path, rep)


def _read_json(path, stats, warn, rep, **_) -> Iterator[dict]:
    numbered = list(_lines(path, stats, warn))
    text = "".join(line for _, line in numbered)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        # A .json file that holds JSON lines: the first object parses and then "Extra data" follows.
        if e.msg == "Extra data" and text.lstrip().startswith("{"):
            yield from _json_lines(numbered, path, rep)
            return
        raise UserError(f"{path}:{e.lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
    if isinstance(data, dict) and data and all(isinstance(v, dict) for v in data.values()):
        items = list(data.items())  # {"key": {record}, ...}
    elif isinstance(data, dict):
        items = [(None, data)]
    elif isinstance(data, list):
        items = [(None, value) for value in data]
    else:
        raise UserError(f"{path}: expected a JSON list or object, found {type(data).__name__}")
    for n, (key, obj) in enumerate(items, 1):
        if not isinstance(obj, dict):
            rep.bad(n, "not a JSON object", type(obj).__name__)
            continue
        obj = dict(obj)
        if key is not None:
            obj["_key"] = key
        obj["_source"], obj["_line"] = path, n
        yield obj


def _read_txt(path, stats, warn, rep, txt_mode="line", **_) -> Iterator[dict]:
    if txt_mode == "line":
        for n, line in _lines(path, stats, warn):
            text = line.rstrip("\r\n")
            if text.strip():
                yield {"text": text, "_source": path, "_line": n}
        return
    start, para = 0, []
    for n, line in _lines(path, stats, warn):
        text = line.rstrip("\r\n")
        if text.strip():
            if not para:
                start = n
            para.append(text)
        elif para:
            yield {"text": "\n".join(para), "_source": path, "_line": start}
            para = []
    if para:
        yield {"text": "\n".join(para), "_source": path, "_line": start}


def _read_csv(path, stats, warn, rep, **_) -> Iterator[dict]:
    # Long text cells (a whole article) exceed csv's default 128 KiB field limit.
    csv.field_size_limit(max(csv.field_size_limit(), 2**31 - 1))
    delimiter = "\t" if path.lower().endswith(".tsv") else ","
    source = (line for _, line in _lines(path, stats, warn))
    # strict: broken quoting is reported as a malformed row instead of being read as some other text.
    reader = csv.reader(source, delimiter=delimiter, strict=True)
    header, prev_end = None, 0
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            rep.bad(prev_end + 1, "unreadable csv row", str(e))
            prev_end = reader.line_num
            continue
        start, prev_end = prev_end + 1, reader.line_num
        if not row:
            continue
        if header is None:
            header = row
            dupes = sorted({h for h in header if header.count(h) > 1})
            if dupes:
                raise UserError(f"{path}:{start}: duplicate column names in the header: {', '.join(dupes)}")
            continue
        if len(row) != len(header):
            rep.bad(start, "wrong number of fields", f"{len(row)} instead of {len(header)}")
            continue
        rec = dict(zip(header, row))
        rec["_source"], rec["_line"] = path, start
        yield rec


def _read_parquet(path, stats, warn, rep, **_) -> Iterator[dict]:
    import pyarrow.parquet as pq

    n = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=BATCH):
        for rec in batch.to_pylist():
            n += 1
            rec["_source"], rec["_line"] = path, n
            yield rec


def _read_sqlite(src: _Source, stats, warn, rep) -> Iterator[dict]:
    label = _source_label(src)
    bad_text = [False]

    def decode(raw: bytes) -> str:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            bad_text[0] = True
            return raw.decode("utf-8", errors="replace")

    con = _sqlite_connect(src.path)
    con.text_factory = decode
    try:
        if _is_query(src.selector):
            sql = src.selector
        else:
            sql = 'SELECT * FROM "' + src.selector.replace('"', '""') + '"'
        try:
            cur = con.execute(sql)
        except sqlite3.Error as e:
            raise UserError(f"{src.path}: SQL error: {e} in: {' '.join(sql.split())}") from None
        names = [d[0] for d in cur.description]
        dupes = sorted({c for c in names if names.count(c) > 1})
        if dupes:
            raise UserError(f"{label}: duplicate column names: {', '.join(dupes)} (rename them with AS)")
        n, warned = 0, False
        while rows := cur.fetchmany(BATCH):
            for row in rows:
                n += 1
                if bad_text[0]:
                    bad_text[0] = False
                    stats.undecodable += 1
                    if not warned:
                        warned = True
                        warn(f"{label}:{n}: bytes that are not UTF-8 replaced by U+FFFD (further rows only counted)")
                rec = dict(zip(names, row))
                rec["_source"], rec["_line"] = label, n
                yield rec
    finally:
        con.close()


def _read_hf(src: _Source, stats, warn, rep) -> Iterator[dict]:
    import datasets

    ds = datasets.load_from_disk(src.path)
    label = src.path
    if src.selector is not None:
        ds, label = ds[src.selector], f"{src.path}::{src.selector}"
    n = 0
    for batch in ds.iter(batch_size=BATCH):
        columns = list(batch)
        for values in zip(*(batch[c] for c in columns)):
            n += 1
            rec = dict(zip(columns, values))
            rec["_source"], rec["_line"] = label, n
            yield rec


_FILE_READERS = {".json": _read_json, ".txt": _read_txt, ".csv": _read_csv, ".tsv": _read_csv,
                 ".parquet": _read_parquet} | {ext: _read_jsonl for ext in JSONL_EXTS}


def _source_label(src: _Source) -> str:
    if src.kind == "sqlite":
        return src.path if _is_query(src.selector) else f"{src.path}::{src.selector}"
    if src.kind == "hf" and src.selector is not None:
        return f"{src.path}::{src.selector}"
    return src.path


def _fields_of(records_fields: dict) -> str:
    names = [k for k in records_fields if k not in ("_source", "_line", "_key")]
    return ", ".join(names[:30]) + (", ..." if len(names) > 30 else "") or "none"


def _require_text_field(records: Iterator[dict], label: str, name: str, rep: _Reporter) -> Iterator[dict]:
    """Skip records without a string `name`; fail if the source does not have that field at all."""
    reason = f"missing field '{name}'"
    seen = False
    pending: list[int] = []  # lines of the leading records that lack the field
    fields: dict[str, None] = {}  # the fields those records do have, in order of appearance
    for rec in records:
        if name in rec:
            if not seen:
                seen = True
                for line in pending:
                    rep.bad(line, reason)
                pending = []
            if isinstance(rec[name], str):
                yield rec
            else:
                rep.bad(rec["_line"], reason, f"'{name}' is {type(rec[name]).__name__}, not text")
        elif seen:
            rep.bad(rec["_line"], reason)
        else:
            pending.append(rec["_line"])
            fields.update(dict.fromkeys(rec))
            if len(pending) >= FIELD_PROBE:
                raise UserError(
                    f"{label}: no field '{name}' in the first {len(pending)} records (fields: {_fields_of(fields)})"
                )
    if pending:
        raise UserError(f"{label}: no field '{name}' (fields: {_fields_of(fields)})")


def read_records(
    src: str | os.PathLike,
    text_field: str | None = None,
    stats: ReadStats | None = None,
    warn: Callable[[str], object] = logger.warning,
    txt_mode: str = "line",
) -> Iterator[dict]:
    """Yield the records of `src` (a file, `file.db::table|query`, save_to_disk folder, glob or folder).

    Paths are checked now (a missing file or empty glob raises `UserError` at once); the records are
    read lazily. With `text_field`, only records whose field is a string are yielded. `txt_mode` is
    "line" (one record per line) or "paragraph" (blocks separated by blank lines). See the module
    docstring for what `_line` means in each format.
    """
    if txt_mode not in ("line", "paragraph"):
        raise UserError(f"txt_mode must be 'line' or 'paragraph', not '{txt_mode}'")
    sources = _resolve(src)
    stats = stats if stats is not None else ReadStats()
    return _iter_sources(sources, text_field, stats, warn, txt_mode)


def _iter_sources(sources, text_field, stats, warn, txt_mode) -> Iterator[dict]:
    for src in sources:
        label = _source_label(src)
        rep = _Reporter(label, stats, warn)
        if src.kind == "sqlite":
            records = _read_sqlite(src, stats, warn, rep)
        elif src.kind == "hf":
            records = _read_hf(src, stats, warn, rep)
        else:
            reader = _FILE_READERS[Path(src.path).suffix.lower()]
            records = reader(src.path, stats, warn, rep, txt_mode=txt_mode)
        if text_field is not None:
            records = _require_text_field(records, label, text_field, rep)
        for rec in records:
            stats.read += 1
            yield rec
        rep.done()


# ---------------------------------------------------------------------------------------------
# Our own JSONL outputs.


def _json_default(obj):
    if isinstance(obj, (datetime.date, datetime.datetime, datetime.time)):
        return obj.isoformat()
    if isinstance(obj, decimal.Decimal):
        return str(obj)
    if hasattr(obj, "item"):  # numpy scalars
        return obj.item()
    if hasattr(obj, "tolist"):  # numpy arrays
        return obj.tolist()
    raise TypeError(f"cannot write {type(obj).__name__} to JSON")


def write_jsonl(path: str | os.PathLike, records: Iterable[dict]) -> int:
    """Write records as UTF-8 JSON lines, atomically (a reader never sees half a file). Returns the count."""
    n = 0
    with atomic_open(path) as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False, default=_json_default) + "\n")
            n += 1
    return n


def read_jsonl_numbered(path: str | os.PathLike) -> Iterator[tuple[int, dict]]:
    """`read_jsonl`, with each record's line number: (line, record), for callers that report `file:line`."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such file")

    def records() -> Iterator[tuple[int, dict]]:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"{path}:{n}: invalid JSON ({e.msg} at column {e.colno})") from None
                if not isinstance(obj, dict):
                    raise UserError(f"{path}:{n}: not a JSON object")
                yield n, obj

    return records()


def read_jsonl(path: str | os.PathLike) -> Iterator[dict]:
    """Strictly read a JSONL file we wrote: any bad line raises `UserError` naming file:line."""
    return (obj for _, obj in read_jsonl_numbered(path))


# ---------------------------------------------------------------------------------------------
# SFT records -> chat messages.

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
# The SFT forms we accept, tried in this order: (required fields, optional fields).
SFT_FORMS = [
    (("messages",), ()),
    (("conversations",), ()),
    (("prompt", "completion"), ()),
    (("instruction", "output"), ("input",)),
    (("question", "answer"), ()),
]


def _present(record: dict, key: str) -> bool:
    # Columnar sources (parquet, save_to_disk) fill absent fields with None.
    return record.get(key) is not None


def _as_messages(value, name: str) -> list[dict]:
    """Validate a list of chat messages (role/content, or sharegpt from/value) and return a clean copy."""
    if not isinstance(value, list) or not value:
        raise ValueError(f"'{name}' is not a non-empty list of messages")
    out = []
    for m in value:
        if not isinstance(m, dict):
            raise ValueError(f"'{name}' holds a {type(m).__name__}, not a message object")
        if "role" in m:
            role, content = m.get("role"), m.get("content")
        elif "from" in m:
            role, content = SHAREGPT_ROLES.get(m.get("from"), m.get("from")), m.get("value")
        else:
            raise ValueError(f"'{name}' holds a message without 'role' (or 'from')")
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r} in '{name}'")
        if not isinstance(content, str):
            raise ValueError(f"message content is not text in '{name}'")
        out.append({"role": role, "content": content})
    return out


def _text(record: dict, key: str) -> str:
    value = record[key]
    if not isinstance(value, str):
        raise ValueError(f"field '{key}' is {type(value).__name__}, not text")
    return value


def _check_conversation(messages: list[dict]) -> list[dict]:
    if any(not m["content"].strip() for m in messages):
        raise ValueError("empty message content")
    if any(m["role"] == "system" for m in messages[1:]):
        raise ValueError("system message not at the start")
    if not any(m["role"] == "user" for m in messages):
        raise ValueError("no user message")
    if messages[-1]["role"] != "assistant":
        raise ValueError("last message is not from the assistant")
    return messages


def _match_form(record: dict) -> tuple[tuple, tuple]:
    for required, optional in SFT_FORMS:
        if all(_present(record, k) for k in required):
            return required, optional
    fields = ", ".join(k for k in record if k not in ("_source", "_line")) or "none"
    for required, _ in SFT_FORMS:
        have = [k for k in required if _present(record, k)]
        if have:
            missing = [k for k in required if k not in have]
            raise ValueError(f"field '{missing[0]}' missing next to '{have[0]}' (fields: {fields})")
    raise ValueError(
        "no SFT form matched; expected messages, conversations, prompt+completion, "
        f"instruction+output or question+answer (fields: {fields})"
    )


def to_messages(record: dict) -> list[dict]:
    """Chat messages [{role, content}, ...] for one SFT record, or ValueError(reason).

    Accepted forms, first match wins: `messages` (role/content); `conversations` (sharegpt
    from/value, human->user, gpt->assistant); `prompt` + `completion` (strings or message lists);
    `instruction` + optional `input` + `output` (the input follows the instruction after a blank
    line); `question` + `answer`. A `system` string becomes the first message.
    """
    return _convert(record)[0]


def _convert(record: dict) -> tuple[list[dict], set[str]]:
    """to_messages, plus the record fields the matched form consumed."""
    required, optional = _match_form(record)
    consumed = set(required) | set(optional) | {"system"}
    if required[0] in ("messages", "conversations"):
        messages = _as_messages(record[required[0]], required[0])
    elif required[0] == "prompt":
        prompt, completion = record["prompt"], record["completion"]
        prompt = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else _as_messages(prompt, "prompt")
        if isinstance(completion, str):
            completion = [{"role": "assistant", "content": completion}]
        else:
            completion = _as_messages(completion, "completion")
        messages = prompt + completion
    elif required[0] == "instruction":
        user = _text(record, "instruction")
        if _present(record, "input"):
            extra = _text(record, "input")
            if extra.strip():
                user = f"{user}\n\n{extra}"
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": _text(record, "output")}]
    else:
        messages = [
            {"role": "user", "content": _text(record, "question")},
            {"role": "assistant", "content": _text(record, "answer")},
        ]
    if _present(record, "system"):
        system = _text(record, "system")
        if messages[0]["role"] == "system":
            raise ValueError("both a 'system' field and a system message")
        if system.strip():
            messages = [{"role": "system", "content": system}] + messages
    return _check_conversation(messages), consumed


def normalize_sft(
    records: Iterable[dict],
    stats: ReadStats | None = None,
    warn: Callable[[str], object] = logger.warning,
) -> Iterator[dict]:
    """Yield `{"messages": [...], **other fields}` per SFT record; report, count and skip invalid ones.

    The fields consumed by the matched form (and `system`) are dropped; the rest (`id`, `_source`,
    `_line`, ...) are kept. Only `stats.malformed`/`by_reason` are updated: `read_records` already
    counted the records as read.
    """
    stats = stats if stats is not None else ReadStats()
    reporters: dict[str, _Reporter] = {}
    for rec in records:
        label = str(rec.get("_source", "<records>"))
        rep = reporters.setdefault(label, _Reporter(label, stats, warn))
        try:
            messages, consumed = _convert(rec)
        except ValueError as e:
            rep.bad(rec.get("_line", "?"), str(e))
            continue
        yield {"messages": messages, **{k: v for k, v in rec.items() if k not in consumed}}
    for rep in reporters.values():
        rep.done()
