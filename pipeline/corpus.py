"""Corpus ingestion and packing for `kdcache capture`: domain-tagged files → documents → train/val rows of tokens.

A record is text (`--text-field`), a conversation (`messages`) or a prompt–completion pair (pipeline/chat.py
renders the last two with the chat template and marks the trained tokens). Packing `concat` joins documents into
one stream cut at seq_len (text: EOS after each); `isolated` puts whole documents into rows (one longer than
seq_len is truncated, text split into seq_len pieces) and records their lengths, so that teacher and student see
each document alone. A row's position t is *supervised* when token t+1 is trained and in the same document.

Files are streamed one at a time (never the whole corpus in memory). Parquet and `save_to_disk` directories are
read through `datasets`; `.txt` files (one document per non-empty line) and JSON Lines are read line by line here
(`datasets` 5.2 ignores `encoding_errors` for compressed files, and its JSON reader casts mixed-type fields, e.g.
a number among strings, to strings: a bad record would pass unnoticed), a `.json` array with `json.loads`.
Invalid UTF-8 in `.txt` and JSON Lines files (plain or compressed) is replaced with U+FFFD, counted, and reported
once per file on the "kdcache" logger.
"""

import codecs
import contextlib
import glob
import gzip
import hashlib
import io
import itertools
import json
import logging
import os
import re
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml
import zstandard

from cache_format import PACKINGS, SPLITS, KdcacheError
from cache_format.schema import is_domain_name

from . import chat

log = logging.getLogger("kdcache")

_FORMATS = {".jsonl": "json", ".json": "json", ".txt": "text", ".parquet": "parquet"}
SUPPORTED_SUFFIXES = tuple(s + c for s in _FORMATS for c in ("", ".gz", ".zst") if s != ".parquet" or not c)
_SUPPORTED = ", ".join(SUPPORTED_SUFFIXES) + " or a datasets save_to_disk directory"
_READ_ERRORS = (pa.ArrowException, ValueError, OSError, EOFError, zstandard.ZstdError)
_BATCH_ROWS = 1024
_GLOB_CHARS = re.compile(r"[*?[]")

@dataclass(frozen=True)
class DataSpec:
    """One `--data DOMAIN=PATH`: PATH is a file, a directory or a glob."""

    domain: str
    path: str


@dataclass
class CorpusStats:
    """Counts for one domain, filled in while `iter_documents` / `iter_split_rows` run."""

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


# ---------------------------------------------------------------------------------------------------------------
# specs and files

def _check_domain(domain: str, where: str) -> str:
    if not is_domain_name(domain):
        raise KdcacheError(f"{where}: invalid domain name {domain!r} (use letters, digits, '_', '.', '-')")
    return domain


def parse_data_spec(s: str) -> DataSpec:
    """Parse `DOMAIN=PATH` (split at the first '=')."""
    domain, sep, path = s.partition("=")
    if not sep or not domain:
        raise KdcacheError(f"--data {s!r}: expected DOMAIN=PATH, e.g. code=data/code.jsonl")
    if not path:
        raise KdcacheError(f"--data {s!r}: empty PATH")
    return DataSpec(_check_domain(domain, f"--data {s!r}"), path)


def read_yaml(path: str) -> dict:
    """A YAML file's top-level mapping (`--config`, a mixture file); KdcacheError naming the file otherwise."""
    try:
        with open(path, encoding="utf-8") as f:
            doc = yaml.safe_load(f)
    except OSError as e:
        raise KdcacheError(f"cannot read {path}: {e.strerror or e}") from e
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise KdcacheError(f"{path}: invalid YAML: {' '.join(str(e).split())}") from e
    if not isinstance(doc, dict):
        raise KdcacheError(f"{path}: expected a mapping of names to values")
    return doc


def load_mixture(path: str, doc: dict | None = None) -> list[DataSpec]:
    """Data specs from a YAML file (or its already parsed mapping `doc`) with `data: {domain: path or [paths]}` or
    `data: [{domain:, path:}, ...]`.

    Relative paths are relative to the YAML file's directory. Other top-level keys are ignored.
    """
    doc = read_yaml(path) if doc is None else doc
    if "data" not in doc:
        raise KdcacheError(f"{path}: expected a mapping with a `data:` key")
    data = doc["data"]
    if isinstance(data, dict):
        items = list(data.items())
    elif isinstance(data, list) and all(isinstance(i, dict) and set(i) == {"domain", "path"} for i in data):
        items = [(i["domain"], i["path"]) for i in data]
    else:
        raise KdcacheError(f"{path}: `data` must map domain -> path(s) or be a list of {{domain:, path:}} items")
    if not items:
        raise KdcacheError(f"{path}: `data` is empty")
    base = os.path.dirname(path)
    specs = []
    for domain, paths in items:
        _check_domain(domain, path)
        paths = [paths] if isinstance(paths, str) else paths
        if not isinstance(paths, list) or not paths or not all(isinstance(p, str) and p for p in paths):
            raise KdcacheError(f"{path}: domain {domain!r}: path must be a non-empty string or list of strings")
        specs += [DataSpec(domain, os.path.join(base, os.path.expanduser(p))) for p in paths]
    return specs


def group_by_domain(specs: Iterable[DataSpec]) -> dict[str, list[DataSpec]]:
    """Specs grouped by domain, domains and specs in order of first appearance."""
    groups: dict[str, list[DataSpec]] = {}
    for spec in specs:
        groups.setdefault(spec.domain, []).append(spec)
    return groups


def _format(path: str) -> str | None:
    """'json', 'text', 'parquet', 'dataset' (save_to_disk directory) or None (unsupported)."""
    if os.path.isdir(path):
        return "dataset" if _is_saved_dataset(path) else None
    name = path.lower()
    suffix = next((s for s in SUPPORTED_SUFFIXES if name.endswith(s)), None)
    return _FORMATS[suffix.removesuffix(".gz").removesuffix(".zst")] if suffix else None


def _is_saved_dataset(path: str) -> bool:
    return all(os.path.isfile(os.path.join(path, n)) for n in ("dataset_info.json", "state.json"))


def _walk(root: str) -> list[str]:
    """Supported files under root (recursively, hidden entries skipped); save_to_disk directories as one entry."""
    if _is_saved_dataset(root):
        return [root]
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        subdirs = [os.path.join(dirpath, d) for d in dirnames if not d.startswith(".")]
        found += [d for d in subdirs if _is_saved_dataset(d)]
        dirnames[:] = [os.path.basename(d) for d in subdirs if not _is_saved_dataset(d)]
        if "dataset_dict.json" in filenames:  # a DatasetDict.save_to_disk directory: only its split directories
            continue
        files = [os.path.join(dirpath, f) for f in filenames if not f.startswith(".")]
        found += [f for f in files if _format(f)]
    return found


def resolve_files(spec: DataSpec) -> list[str]:
    """The data files of a spec (a file, a directory searched recursively, or a glob), sorted.

    Unsupported files found in a directory or by a glob are skipped; one named directly is an error.
    """
    path = spec.path
    if os.path.isfile(path):
        if not _format(path):
            raise KdcacheError(f"{path}: unsupported file type (domain {spec.domain!r}; supported: {_SUPPORTED})")
        return [path]
    if os.path.isdir(path):
        files = _walk(path)
    elif _GLOB_CHARS.search(path):
        matches = glob.glob(path, recursive=True)
        if not matches:
            raise KdcacheError(f"data path for domain {spec.domain!r}: no files match {path}")
        files = [f for m in matches for f in (_walk(m) if os.path.isdir(m) else [m] if _format(m) else [])]
    else:
        raise KdcacheError(f"data path for domain {spec.domain!r} does not exist: {path}")
    if not files:
        raise KdcacheError(f"{path}: no supported data files (domain {spec.domain!r}; supported: {_SUPPORTED})")
    return sorted(set(files))


# ---------------------------------------------------------------------------------------------------------------
# documents

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


def iter_documents(spec: DataSpec, text_field: str = "text", stats: CorpusStats | None = None,
                   fmt: str = "auto") -> Iterator["str | Conversation"]:
    """Documents of all files of a spec in `resolve_files` order; empty/whitespace-only documents are skipped."""
    stats = stats if stats is not None else CorpusStats()
    for path in resolve_files(spec):
        yield from _file_documents(path, text_field, stats, fmt)


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


# ---------------------------------------------------------------------------------------------------------------
# splits, tokens, rows

def split_of(text: str, seed: int, val_fraction: float) -> str:
    """'val' or 'train' by a hash of the document's content and the split seed."""
    h = int(hashlib.sha256(f"{seed}:{text}".encode()).hexdigest()[:16], 16)
    return "val" if h / 2**64 < val_fraction else "train"


def _batched(items: Iterable, n: int) -> Iterator[list]:
    it = iter(items)
    while batch := list(itertools.islice(it, n)):
        yield batch


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    return tokenizer(texts, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]


_MARGIN = 256      # tokens past a cut that a prefix's tokenization must reach to be the whole text's there


def _prefix_chars(limit: int) -> int:
    """Characters of a first prefix for limit + _MARGIN tokens (8 a token); a text no longer is tokenized whole."""
    return 8 * (limit + _MARGIN)


def _first_tokens(tokenizer, text: str, limit: int) -> list[int]:
    """The first limit + 1 token ids of a long text, tokenizing growing prefixes of it until one gives _MARGIN
    tokens past them: tokenization is local, so those are the whole text's."""
    n = _prefix_chars(limit)
    while n < len(text):
        ids = _encode(tokenizer, [text[:n]])[0]
        if len(ids) > limit + _MARGIN:
            return ids[:limit + 1]
        n *= 4
    return _encode(tokenizer, [text])[0]


def tokenize_documents(texts: Iterable[str], tokenizer, batch_size: int = 256,
                       limit: int | None = None) -> Iterator[list[int]]:
    """Token ids of each text (no special tokens), in order, from batched tokenizer calls. limit: no more than
    limit + 1 ids of a text are needed (a domain's token cap), so a long text is tokenized only that far."""
    for batch in _batched(texts, batch_size):
        long = {i for i, t in enumerate(batch) if limit is not None and len(t) > _prefix_chars(limit)}
        short = [t for i, t in enumerate(batch) if i not in long]
        ids = iter(_encode(tokenizer, short) if short else ())
        for i, text in enumerate(batch):
            yield _first_tokens(tokenizer, text, limit) if i in long else next(ids)


@dataclass(frozen=True)
class Row:
    """One packed row for the teacher."""

    input_ids: np.ndarray                 # (T,) int32
    supervised: np.ndarray                # (T,) bool: token t+1 is trained and in the same document as t
    doc_lengths: list[int] | None = None  # isolated packing: the lengths of its documents (sum T)

    def __len__(self) -> int:
        return len(self.input_ids)


class _Packer:
    """Cuts documents (tokens with their trained flags) into rows of at most seq_len tokens, holding at most one
    unfinished row. concat: one stream, cut every seq_len tokens. isolated: whole documents of at most seq_len
    tokens, a row closed when the next document does not fit."""

    def __init__(self, seq_len: int, isolated: bool = False):
        if seq_len < 1:
            raise KdcacheError(f"seq_len must be at least 1, got {seq_len}")
        self.seq_len, self.isolated = seq_len, isolated
        self._pieces: list[tuple[np.ndarray, np.ndarray]] = []
        self._fill = 0

    def add(self, tokens: np.ndarray, trained: np.ndarray) -> list[Row]:
        """Append one document; return the rows it completes."""
        done = []
        if self.isolated:
            if len(tokens) > self.seq_len:
                raise ValueError(f"an isolated document of {len(tokens)} tokens is longer than seq_len")
            if self._fill + len(tokens) > self.seq_len:
                done.append(self._take())
            self._pieces.append((tokens, trained))
            self._fill += len(tokens)
        else:
            pos = 0
            while pos < len(tokens):
                take = min(self.seq_len - self._fill, len(tokens) - pos)
                self._pieces.append((tokens[pos:pos + take], trained[pos:pos + take]))
                self._fill += take
                pos += take
                if self._fill == self.seq_len:
                    done.append(self._take())
        if self._fill == self.seq_len:
            done.append(self._take())
        return done

    def flush(self) -> Row | None:
        """The final partial row, if any tokens remain."""
        return self._take() if self._fill else None

    def _take(self) -> Row:
        tokens = np.concatenate([t for t, _ in self._pieces]).astype(np.int32)          # (T,)
        trained = np.concatenate([m for _, m in self._pieces])                          # (T,)
        lengths = [len(t) for t, _ in self._pieces] if self.isolated else None
        supervised = np.append(trained[1:], False)                                      # (T,) t -> token t+1
        if lengths is not None:
            supervised[np.cumsum(lengths)[:-1] - 1] = False                             # a document's last token
        self._pieces, self._fill = [], 0
        return Row(tokens, supervised, lengths)


def _with_eos(ids: Sequence[int], eos_id: int) -> np.ndarray:
    tokens = np.empty(len(ids) + 1, np.int32)
    tokens[:-1] = ids
    tokens[-1] = eos_id
    return tokens


def pack_documents(token_ids: Iterable[Sequence[int]], seq_len: int, eos_id: int) -> Iterator[np.ndarray]:
    """Documents joined with an EOS after each, cut into int32 rows of seq_len; the last row may be shorter."""
    packer = _Packer(seq_len)
    for ids in token_ids:
        tokens = _with_eos(ids, eos_id)
        yield from (row.input_ids for row in packer.add(tokens, np.ones(len(tokens), bool)))
    if (tail := packer.flush()) is not None:
        yield tail.input_ids


def _tokenized_documents(files: list[str], tokenizer, text_field: str, stats: CorpusStats, batch_size: int,
                         reading: Reading,
                         limit: int | None = None) -> Iterator[tuple[str, np.ndarray, np.ndarray, bool]]:
    """(split key, tokens (n,) int32, trained (n,) bool, whether it is text) of the files' documents, in order.
    Text: its tokens and EOS, all trained. Conversations: rendered by chat.render_example (a plain
    prompt-completion pair gets EOS, trained); one without a trained token is counted in stats.no_response and
    skipped. Batches never span files, so a file is only opened once the consumer has used every document before
    it (closing this generator at the cap opens no further file)."""
    eos_id = tokenizer.eos_token_id
    for path in files:
        with contextlib.closing(_file_documents(path, text_field, stats, reading.format)) as documents:
            for batch in _batched(documents, batch_size):
                texts = [d for d in batch if isinstance(d, str)]
                text_ids = iter(tokenize_documents(texts, tokenizer, batch_size, limit) if texts else ())
                for doc in batch:
                    if isinstance(doc, str):
                        tokens = _with_eos(next(text_ids), eos_id)
                        yield doc, tokens, np.ones(len(tokens), bool), True
                        continue
                    ids, trained = chat.render_example(tokenizer, doc.example, reading.train_on, doc.where,
                                                       reading.template, reading.train_reasoning)
                    if not doc.example.messages:                          # a plain pair: the model learns to stop
                        ids, trained = [*ids, eos_id], [*trained, True]
                    if not any(trained[1:]):
                        stats.no_response += 1
                        continue
                    yield doc.key, np.asarray(ids, np.int32), np.asarray(trained, bool), False


def _fit(tokens: np.ndarray, trained: np.ndarray, is_text: bool, seq_len: int,
         stats: CorpusStats) -> list[tuple[np.ndarray, np.ndarray]]:
    """Isolated packing: a text document longer than seq_len as seq_len pieces, a conversation truncated at the
    end (counted; dropped when nothing trained is left)."""
    if len(tokens) <= seq_len:
        return [(tokens, trained)]
    if is_text:
        return [(tokens[i:i + seq_len], trained[i:i + seq_len]) for i in range(0, len(tokens), seq_len)]
    stats.truncated += 1
    return [(tokens[:seq_len], trained[:seq_len])] if trained[1:seq_len].any() else []


def _next_row_index(stats: CorpusStats, split: str, row: Row) -> int:
    stats.rows[split] += 1
    stats.supervised[split] += int(row.supervised.sum())
    return stats.rows[split] - 1


def iter_split_rows(spec: DataSpec | Sequence[DataSpec], tokenizer, seq_len: int, seed: int, val_fraction: float,
                    text_field: str = "text", max_tokens: int | None = None, stats: CorpusStats | None = None,
                    batch_size: int = 256, reading: Reading = Reading()) -> Iterator[tuple[str, int, Row]]:
    """Packed rows of one domain as (split, row index within the split, Row), deterministic and streamed.

    `spec` is one DataSpec or several of the same domain (read in order; all paths are resolved up front). Each
    document goes to the split given by `split_of` (of its text, or of a conversation's record) and to its split's
    packer (`reading.packing`); full rows are yielded as they complete, the final short rows of train then val at
    the end. `max_tokens` caps the domain's tokens (both splits): reading stops there and the last document is cut
    so the total is exactly the cap. `stats` (optional) is filled in as rows are produced.
    """
    specs = [spec] if isinstance(spec, DataSpec) else list(spec)
    domains = {s.domain for s in specs}
    if len(domains) != 1:
        raise ValueError(f"iter_split_rows needs the specs of exactly one domain, got {sorted(domains)}")
    if not 0.0 <= val_fraction <= 1.0:
        raise KdcacheError(f"val_fraction must be between 0 and 1, got {val_fraction}")
    if max_tokens is not None and max_tokens < 1:
        raise KdcacheError(f"max_tokens must be at least 1, got {max_tokens}")
    if tokenizer.eos_token_id is None:
        raise KdcacheError("the tokenizer has no EOS token; packing needs one between documents")
    stats = stats if stats is not None else CorpusStats()
    isolated = reading.packing == "isolated"
    packers = {split: _Packer(seq_len, isolated) for split in SPLITS}
    files = [f for s in specs for f in resolve_files(s)]
    budget = max_tokens
    documents = _tokenized_documents(files, tokenizer, text_field, stats, batch_size, reading, max_tokens)
    with contextlib.closing(documents):
        for key, tokens, trained, is_text in documents:
            split = split_of(key, seed, val_fraction)
            pieces = _fit(tokens, trained, is_text, seq_len, stats) if isolated else [(tokens, trained)]
            for tokens, trained in pieces:
                tokens, trained = tokens[:budget], trained[:budget]
                stats.documents[split] += 1
                stats.tokens[split] += len(tokens)
                for row in packers[split].add(tokens, trained):
                    yield split, _next_row_index(stats, split, row), row
                if budget is not None:
                    budget -= len(tokens)
                    if budget == 0:
                        break
            if budget == 0:
                stats.capped = True
                break
    if not sum(stats.documents.values()):
        skipped = [f"{n} {what} skipped" for n, what in ((stats.skipped_empty, "empty"),
                                                         (stats.no_response, "without an assistant turn to train on"),
                                                         (stats.truncated, "with no response left at --seq-len"))
                   if n]
        raise KdcacheError(f"domain {specs[0].domain!r}: no documents in {', '.join(s.path for s in specs)} "
                           f"({'; '.join(skipped) or 'none skipped'})")
    for split in SPLITS:
        if (tail := packers[split].flush()) is not None:
            yield split, _next_row_index(stats, split, tail), tail
