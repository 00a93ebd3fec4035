"""Corpus packing: documents → train/val splits → tokens → rows of seq_len.

Packing `concat` joins documents into one stream cut at seq_len (text: EOS after each); `isolated` puts whole
documents into rows (one longer than seq_len is truncated, text split into seq_len pieces) and records their
lengths, so that teacher and student see each document alone. A row's position t is *supervised* when token t+1 is
trained and in the same document.
"""

import contextlib
import hashlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from cache_format import SPLITS, KdcacheError

from .. import chat
from .files import DataSpec, resolve_files
from .records import CorpusStats, Reading, _batched, _file_documents


def split_of(text: str, seed: int, val_fraction: float) -> str:
    """'val' or 'train' by a hash of the document's content and the split seed."""
    h = int(hashlib.sha256(f"{seed}:{text}".encode()).hexdigest()[:16], 16)
    return "val" if h / 2**64 < val_fraction else "train"


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
