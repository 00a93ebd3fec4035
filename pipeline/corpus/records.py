"""Corpus records: the documents of one file, streamed.

A record is text (`--text-field`), a conversation (`messages`) or a prompt–completion pair (pipeline/chat.py
renders the last two with the chat template and marks the trained tokens). Parquet and `save_to_disk` directories
are read through `datasets`; `.txt` files (one document per non-empty line) and JSON Lines are read line by line
here (`datasets` 5.2 ignores `encoding_errors` for compressed files, and its JSON reader casts mixed-type fields,
e.g. a number among strings, to strings: a bad record would pass unnoticed), a `.json` array with `json.loads`.
Invalid UTF-8 in `.txt` and JSON Lines files (plain or compressed) is replaced with U+FFFD, counted, and reported
once per file on the "kdcache" logger.
"""

import codecs
import contextlib
import gzip
import io
import itertools
import json
import logging
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq
import zstandard

from cache_format import PACKINGS, SPLITS, KdcacheError

from .. import chat
from .files import DataSpec, _format, resolve_files

log = logging.getLogger("kdcache")

_READ_ERRORS = (pa.ArrowException, ValueError, OSError, EOFError, zstandard.ZstdError)
_BATCH_ROWS = 1024


@dataclass
class CorpusStats:
    """Counts for one domain, filled in while `iter_split_rows` runs."""

    files: int = 0
    skipped_empty: int = 0                    # empty or whitespace-only documents
    invalid_utf8: int = 0                     # invalid UTF-8 sequences replaced by U+FFFD
    documents: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SPLITS, 0))  # packed, per split
    tokens: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SPLITS, 0))     # incl. EOS, per split
    rows: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SPLITS, 0))       # incl. a final short row
    supervised: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SPLITS, 0))  # positions, per split
    no_response: int = 0                      # conversations skipped: no assistant turn to train on
    boms: int = 0                             # text files whose leading UTF-8 byte-order mark was dropped
    truncated: int = 0                        # isolated packing: documents cut at seq_len (text: split)
    capped: bool = False                      # reading stopped at max_tokens


@dataclass(frozen=True)
class Reading:
    """How records become documents and rows: --format, --train-on, the --chat-template text, --packing,
    --train-reasoning."""

    format: str = "auto"
    train_on: str = "assistant"
    template: str | None = None
    packing: str = "concat"
    train_reasoning: bool = True

    def __post_init__(self):
        for name, value, allowed in (("--format", self.format, chat.FORMATS), ("--packing", self.packing, PACKINGS),
                                     ("--train-on", self.train_on, chat.TRAIN_ON)):
            if value not in allowed:
                raise KdcacheError(f"{name} {value!r} is not one of {', '.join(allowed)}")


def _batched(items: Iterable, n: int) -> Iterator[list]:
    it = iter(items)
    while batch := list(itertools.islice(it, n)):
        yield batch


_decoding = threading.local()  # invalid UTF-8 sequences replaced by this thread since the last _next_counted


def _replace_and_count(err: UnicodeError) -> tuple[str, int]:
    if not isinstance(err, UnicodeDecodeError):
        raise err
    _decoding.replaced = getattr(_decoding, "replaced", 0) + 1
    return "\ufffd", err.end


codecs.register_error("kdcache-replace", _replace_and_count)


def _next_counted(iterator: Iterator) -> tuple[object, int]:
    """(next item or None, invalid UTF-8 sequences replaced while producing it)."""
    _decoding.replaced = 0
    item = next(iterator, None)
    return item, _decoding.replaced


def _open_binary(path: str) -> io.BufferedIOBase:
    """A file, decompressed by its suffix (.gz, .zst)."""
    if path.lower().endswith(".gz"):
        return gzip.open(path, "rb")
    if path.lower().endswith(".zst"):
        reader = zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), read_across_frames=True, closefd=True)
        return io.BufferedReader(reader)
    return open(path, "rb")


def _text_batches(path: str) -> Iterator[list[str]]:
    """Lines of a (compressed) text file, without line ends, in batches; universal newlines."""
    with io.TextIOWrapper(_open_binary(path), encoding="utf-8", errors="kdcache-replace") as f:
        while lines := f.readlines(1 << 20):
            yield [line.rstrip("\n") for line in lines]


_RECORD_FIELDS = ("messages", "prompt", "completion")


def _table_batches(ds, path: str, text_field: str, fmt: str) -> Iterator[list]:
    """Batches of a `datasets` dataset: the text column's values (None where a row lacks it) when the records are
    text (--format text, or auto and the batch has no conversation field), else the records as dicts."""
    for table in ds.with_format("arrow").iter(batch_size=_BATCH_ROWS):
        if fmt != "text" and (fmt != "auto" or any(f in table.column_names for f in _RECORD_FIELDS)):
            yield table.to_pylist()
            continue
        if text_field not in table.column_names:
            raise KdcacheError(f"{path}: no field {text_field!r} (fields: {', '.join(table.column_names)}); "
                               "choose one with --text-field")
        column = table.column(text_field)
        if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)
                or pa.types.is_string_view(column.type)):
            raise KdcacheError(f"{path}: field {text_field!r} holds non-string values ({column.type})")
        yield column.to_pylist()


def _json_batches(path: str) -> Iterator[list[dict]]:
    """Records of a JSON Lines file (a `.json` file may hold JSON Lines too), or of a `.json` array, in batches;
    KdcacheError naming the line of the first malformed one."""
    with _open_binary(path) as f:
        is_array = f.read(64).lstrip(codecs.BOM_UTF8 + b" \t\r\n").startswith(b"[")
    if is_array:
        with _open_binary(path) as f:
            try:
                records = json.loads(f.read().decode("utf-8").lstrip("\ufeff"))
            except UnicodeDecodeError as e:
                raise KdcacheError(f"{path}: invalid UTF-8 at byte {e.start} (only JSON Lines files are read with "
                                   "replacement)") from None
            except json.JSONDecodeError as e:
                raise KdcacheError(f"{path}: malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
        if not all(isinstance(r, dict) for r in records):
            raise KdcacheError(f"{path}: malformed JSON: expected an array of objects")
        yield from _batched(records, _BATCH_ROWS)
        return
    n = 0
    for lines in _text_batches(path):
        batch = []
        for line in lines:
            n += 1
            if not line.strip():
                continue
            try:
                record = json.loads(line.lstrip("\ufeff") if n == 1 else line)
            except json.JSONDecodeError as e:
                raise KdcacheError(f"{path}: malformed JSON at line {n}: {e.msg}") from None
            if not isinstance(record, dict):
                raise KdcacheError(f"{path}: malformed JSON Lines at line {n}: not an object")
            batch.append(record)
        yield batch


def _file_batches(path: str, text_field: str, fmt: str) -> Iterator[list]:
    """Batches of one file's records: strings (text lines, a text column) or dicts (JSON records, see
    _table_batches). Text and JSON Lines bytes are decoded with the counting replacement handler."""
    kind = _format(path)
    if kind == "text":
        if fmt in ("chat", "prompt-completion"):
            raise KdcacheError(f"{path}: --format {fmt} needs records (JSON, JSON Lines, Parquet or a save_to_disk "
                               "directory), not lines of text")
        return _text_batches(path)
    if kind == "json":
        return _json_batches(path)
    from datasets import load_dataset, load_from_disk  # heavy import, only when reading

    if kind == "dataset":
        return _table_batches(load_from_disk(path), path, text_field, fmt)
    if pq.ParquetFile(path).metadata.num_rows == 0:       # datasets fails on it ("BatchSize")
        return iter(())
    return _table_batches(load_dataset("parquet", data_files=[path], split="train", streaming=True), path,
                          text_field, fmt)


def _read_error(path: str, error: Exception) -> KdcacheError:
    detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return KdcacheError(f"{path}: cannot read: {detail}")


@dataclass(frozen=True)
class Conversation:
    """A chat or prompt–completion record to render (chat.render_example); `key` decides its split."""

    where: str                 # "FILE: record N", for messages
    key: str                   # the record as canonical JSON
    example: chat.Example


def _document(value, path: str, n: int, text_field: str, fmt: str) -> "str | Conversation":
    """Record n of a file (a string, or a dict from a records batch) as a text document or a Conversation."""
    if isinstance(value, str) or value is None:
        if value is None:
            raise KdcacheError(f"{path}: record {n} has no {text_field!r} field")
        return value
    where = f"{path}: record {n}"
    kind = chat.record_format(value, text_field, where) if fmt == "auto" else fmt
    if kind == "text":
        text = value.get(text_field)
        if text is None:
            fields = ", ".join(sorted(k for k, v in value.items() if v is not None)) or "none"
            raise KdcacheError(f"{where}: no field {text_field!r} (fields: {fields}); choose one with --text-field")
        if not isinstance(text, str):
            raise KdcacheError(f"{where}: field {text_field!r} holds a non-string value {chat.show(text)}")
        return text
    return Conversation(where, record_key(value), chat.to_messages(value, kind, where))


def record_key(record: dict) -> str:
    """What decides a conversation's split (split_of): its messages / prompt / completion as canonical JSON."""
    return json.dumps({k: v for k, v in record.items() if k in _RECORD_FIELDS}, sort_keys=True, ensure_ascii=False)


def _file_documents(path: str, text_field: str, stats: CorpusStats,
                    fmt: str = "auto") -> Iterator["str | Conversation"]:
    """Non-empty documents of one file (texts and Conversations); invalid UTF-8 reported once when the file is
    done (or abandoned)."""
    stats.files += 1
    rows = replaced = 0
    try:
        try:
            batches = _file_batches(path, text_field, fmt)
            while True:
                batch, n = _next_counted(batches)
                replaced += n
                if batch is None:
                    break
                for value in batch:
                    rows += 1
                    if rows == 1 and isinstance(value, str) and value.startswith("\ufeff"):
                        value = value[1:]                      # a text file's UTF-8 byte-order mark
                        stats.boms += 1
                        log.info("%s: its UTF-8 byte-order mark dropped", path)
                    document = _document(value, path, rows, text_field, fmt)
                    if not isinstance(document, str) or document.strip():
                        yield document
                    else:
                        stats.skipped_empty += 1
        except _READ_ERRORS as e:
            raise _read_error(path, e) from e
        if rows == 0:
            raise KdcacheError(f"{path}: empty file (no documents)")
    finally:
        stats.invalid_utf8 += replaced
        if replaced:
            log.warning("%s: %d invalid UTF-8 sequences replaced", path, replaced)


def holds_conversations(specs: Iterable[DataSpec], text_field: str, fmt: str) -> bool:
    """Whether the corpus holds conversations (sets the default packing): --format chat or prompt-completion, or
    with auto a file whose first record is one (text files and text records: no)."""
    if fmt != "auto":
        return fmt != "text"
    for spec in specs:
        for path in resolve_files(spec):
            if _format(path) != "text":
                with contextlib.closing(_file_documents(path, text_field, CorpusStats(), fmt)) as documents:
                    if isinstance(next(documents, None), Conversation):
                        return True
    return False


