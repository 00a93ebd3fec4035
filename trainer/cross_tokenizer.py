"""Cross-tokenizer distillation: one teacher cache teaching a student with another tokenizer (`--cross-tokenizer`).

A cache row holds teacher ids; their bytes (cache_format.token_bytes, recorded by capture) are the text the teacher
read and each token's byte span. `StudentRows` tokenizes that text with the student's tokenizer and aligns the two
tokenizations by byte spans into chunks that end at the same byte on both sides (GOLD's rule):

    teacher  |def| f|(x|):|          token ends  3 5 8 10
    student  |de|f| f|(|x|):|        token ends  2 3 5 6 8 10
    chunks   [def] [ f] [(x] [):]    common ends 3 5 8 10: [ f] and [):] hold one token a side

A student position whose next token is the only one of its chunk on both sides (so the same string, after a context
that ends at the same byte) is *exactly aligned*: the teacher's top-k there, mapped to student ids by `vocab_map`
(teacher ids whose bytes are a student token; the others' mass joins the tail), is its KD target, and every loss,
AdaKD and DDK apply to those positions as on a same-tokenizer cache. Every other chunk (m teacher tokens, n student
tokens) is *unaligned*; `--unaligned chunk` distils it by its likelihood (losses.chunk_likelihood_kl), the teacher's
probability of the chunk's text (the product of its cached target probabilities) against the student's.

Special tokens: a teacher special token maps to the student's of the same role (eos, bos, pad, unk) or content and
then stands as one unit (one "byte") on both sides; one without a counterpart is read as its text.
"""

import numpy as np

from cache_format import Cache, KdcacheError
from cache_format.fingerprint import named_ids, tokenizer_json
from cache_format.schema import position_ids
from cache_format.token_bytes import TokenBytes, byte_exact_table, token_bytes

ROLES = ("eos", "bos", "pad", "unk")     # a special token maps to the student's of its first role here

def vocab_map(teacher: TokenBytes, student: TokenBytes, teacher_named: dict, student_named: dict) -> np.ndarray:
    """(V_teacher,) int64: the student id standing for the same bytes as each teacher id, -1 where none. A special
    token maps to the student's of the same role (eos first) or content; a student byte-fallback token is chosen
    only when no other student token has its bytes."""
    by_bytes = {}
    for i in np.argsort(~student.fallback, kind="stable"):            # byte-fallback first: the others overwrite
        piece = student.pieces[i]
        if piece is not None and not student.special[i]:
            by_bytes[piece] = int(i)
    specials = {student.pieces[i]: i for i in np.flatnonzero(student.special)}
    out = np.full(len(teacher.pieces), -1, np.int64)
    for i, piece in enumerate(teacher.pieces):
        if piece is not None and not teacher.special[i]:
            out[i] = by_bytes.get(piece, -1)
    for i in np.flatnonzero(teacher.special):
        roles = [student_named.get(name) for name in ROLES if teacher_named.get(name) == i]
        match = next((s for s in roles if s is not None), specials.get(teacher.pieces[i]))
        out[i] = -1 if match is None else match
    return out


def align(teacher_ends: np.ndarray, student_ends: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Chunks of two tokenizations of one byte string: (teacher chunk (T,), student chunk (S,), number of chunks).
    A chunk ends at a byte where both sides end a token; a token belongs to the first chunk ending at or after its
    own end (a token of no bytes joins its neighbour's chunk); tokens past the last common end get chunk C (the
    number of chunks), which is no chunk. ends: (T,) and (S,) non-decreasing byte offsets of each token's end."""
    common = np.intersect1d(teacher_ends, student_ends)                      # (C,) ascending
    return np.searchsorted(common, teacher_ends), np.searchsorted(common, student_ends), len(common)


def _utf8_edges(data: bytes) -> tuple[int, int]:
    """(bytes before the first whole character, bytes of an unfinished character at the end): a row cut inside a
    multi-byte character."""
    lead = 0
    while lead < min(3, len(data)) and data[lead] & 0xC0 == 0x80:
        lead += 1
    for k in range(1, min(4, len(data) - lead) + 1):
        c = data[-k]
        if c & 0xC0 == 0x80:
            continue
        need = 1 if c < 0x80 else 2 if c >> 5 == 0b110 else 3 if c >> 4 == 0b1110 else 4 if c >> 3 == 0b11110 else 1
        return lead, k if need > k else 0
    return lead, 0


class StudentRows:
    """Turns a teacher cache row into the student's row (module doc), with the keys of a reader row:
        input_ids (S,), position_ids (S,), topk_ids / topk_logprobs (S, K) the mapped teacher top-k at exactly
        aligned positions (else 0 / -inf), target_logprobs (S,), supervised (S,) the exactly aligned positions,
        trained (S,) every position whose next token is trained (the CE positions), chunk_id (S,) the unaligned
        chunk a position's next token is in (-1: none), chunk_logprob (S,) the teacher's log-probability of that
        chunk at its last position (NaN elsewhere), domain, row_index, and epoch when the row has one.
    Rows longer than max_len student tokens are cut there; a row of no student tokens keeps none."""

    def __init__(self, teacher: TokenBytes, teacher_named: dict, tokenizer, max_len: int,
                 student: TokenBytes | None = None):
        self.teacher, self.tokenizer, self.max_len = teacher, tokenizer, max_len
        self.student = student if student is not None else token_bytes(tokenizer_json(tokenizer))
        self.vocab_map = vocab_map(teacher, self.student, teacher_named, named_ids(tokenizer))   # (V_t,)
        self.unit = teacher.special & (self.vocab_map >= 0)             # (V_t,) stands as one unit on both sides
        mapped = self.vocab_map[self.vocab_map >= 0]
        self.collisions = len(mapped) != len(np.unique(mapped))         # two teacher ids -> one student id
        self.pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0

    @classmethod
    def for_cache(cls, cache: Cache, tokenizer, max_len: int, where: str = "student") -> "StudentRows":
        """StudentRows for a cache and a student tokenizer; KdcacheError if the cache does not record its token
        bytes (captured before they were: recapture) or the student's tokenizer does not give back text."""
        info = cache.manifest.tokenizer
        text = cache.tokenizer_json()
        if not info.token_bytes or text is None:
            raise KdcacheError(f"{cache.root}: this cache does not record its teacher tokens' text spans (captured by "
                               f"an older kdcache, or a teacher tokenizer whose ids are not fixed bytes); recapture "
                               f"it with this kdcache to train a student with another tokenizer")
        student = byte_exact_table(tokenizer, tokenizer_json(tokenizer))
        if student is None:
            raise KdcacheError(f"{where}: its tokenizer does not give back text byte for byte (neither byte-level "
                               f"BPE nor SentencePiece with byte fallback); it cannot be aligned with the teacher's")
        return cls(token_bytes(text), info.named_ids or {"eos": info.eos_id}, tokenizer, max_len, student)

    def __call__(self, row: dict) -> dict:
        ids = np.asarray(row["input_ids"])                                   # (T,)
        t_len = np.where(self.unit[ids], 1, np.maximum(self.teacher.lengths[ids], 0))   # (T,) bytes, units 1
        t_end = np.cumsum(t_len)                                             # (T,)
        t_start = t_end - t_len
        s_ids, s_end = self._student_tokens(ids, t_start, t_end)             # (S,) each
        s_len = np.diff(s_end, prepend=0)
        s_start = s_end - s_len
        S, K = len(s_ids), row["topk_ids"].shape[1]

        # trained: a student token all of whose bytes belong to trained teacher tokens (token j is trained when
        # position j-1 holds a teacher distribution); a CE position predicts one, in the same document
        t_trained = np.append(False, row["supervised"][:-1])                # (T,)
        untrained = np.concatenate([[0], np.cumsum(np.repeat(~t_trained, t_len))])   # (L+1,)
        s_trained = (s_len > 0) & (untrained[s_end] == untrained[s_start])   # (S,)
        doc_starts = t_start[np.flatnonzero(np.asarray(row["position_ids"]) == 0)[1:]]  # (D-1,) byte offsets
        doc = np.searchsorted(doc_starts, s_start, side="right")            # (S,) each token's document
        trained = np.zeros(S, bool)                                          # (S,) position s -> token s+1
        trained[:-1] = s_trained[1:] & (doc[1:] == doc[:-1])

        t_chunk, s_chunk, C = align(t_end, s_end)
        t_count = np.bincount(t_chunk, minlength=C + 1)                      # (C+1,) tokens per chunk
        s_count = np.bincount(s_chunk, minlength=C + 1)
        only_t = np.full(C + 1, -1, np.int64)                                # the teacher token of a 1:1 chunk
        only_t[t_chunk] = np.arange(len(ids))
        j = only_t[s_chunk]                                                  # (S,) its teacher token, if 1:1
        one_to_one = (s_count[s_chunk] == 1) & (t_count[s_chunk] == 1) & (s_chunk < C) & (j >= 1) & (s_len > 0)
        same_id = self.vocab_map[ids[np.maximum(j, 0)]] == s_ids             # (S,) the same string, by the map
        t_pos = np.maximum(j - 1, 0)                                         # (S,) the teacher position before it
        has_teacher = np.isfinite(row["topk_logprobs"][t_pos, 0])
        aligned = np.zeros(S, bool)                                          # (S,) position s -> token s+1
        aligned[:-1] = (one_to_one & same_id & has_teacher)[1:] & trained[:-1]

        # unaligned chunks: each student token of the chunk trained, each teacher token with its target log-prob
        t_target = np.append(np.nan, row["target_logprobs"][:-1]).astype(np.float64)    # (T,) log p of token j
        chunk_teacher = np.bincount(t_chunk, weights=np.where(t_trained, t_target, np.nan), minlength=C + 1)
        s_pos_ok = np.append(False, trained[:-1] & ~aligned[:-1])            # (S,) token i, by position i-1
        ok_count = np.bincount(s_chunk, weights=s_pos_ok, minlength=C + 1)
        chunk_ok = (ok_count == s_count) & (t_count > 0) & np.isfinite(chunk_teacher)
        chunk_ok[C] = False
        n = min(S, self.max_len)                                             # the student row's length
        if n < S:                                                            # cut: the chunks reaching past it
            chunk_ok[s_chunk[n]:] = False
            trained[n - 1] = aligned[n - 1] = False
        in_chunk = chunk_ok[s_chunk] & s_pos_ok                              # (S,) token i in a distilled chunk
        chunk_id = np.full(S, -1, np.int64)
        chunk_id[np.flatnonzero(in_chunk) - 1] = s_chunk[in_chunk]
        last = np.flatnonzero(in_chunk & np.append(s_chunk[1:] != s_chunk[:-1], True))   # a chunk's last token
        chunk_logprob = np.full(S, np.nan, np.float32)
        chunk_logprob[last - 1] = chunk_teacher[s_chunk[last]]

        topk_ids, topk_lps = np.zeros((n, K), np.int64), np.full((n, K), -np.inf, np.float32)   # (n, K)
        target = np.full(n, np.nan, np.float32)
        at = np.flatnonzero(aligned[:n])                                     # (A,)
        src = t_pos[at + 1]                                                  # (A,) teacher positions
        top = row["topk_ids"][src]                                           # (A, K) teacher ids
        # a teacher's output rows past its tokenizer (Qwen's 151,936 for 151,669 tokens) stand for no text: tail
        mapped = np.where(top < len(self.vocab_map), self.vocab_map[np.minimum(top, len(self.vocab_map) - 1)], -1)
        topk_ids[at] = np.maximum(mapped, 0)
        topk_lps[at] = np.where(mapped >= 0, row["topk_logprobs"][src], -np.inf)
        if self.collisions:
            _merge_duplicates(topk_ids[at], topk_lps, at)
        target[at] = row["target_logprobs"][src]
        lengths = np.bincount(doc[:n])
        out = {"row_index": row["row_index"], "domain": row["domain"], "input_ids": s_ids[:n].astype(np.int32),
               "position_ids": position_ids(lengths[lengths > 0], n), "topk_ids": topk_ids,
               "topk_logprobs": topk_lps, "target_logprobs": target, "supervised": aligned[:n],
               "trained": trained[:n], "chunk_id": chunk_id[:n], "chunk_logprob": chunk_logprob[:n]}
        if "epoch" in row:
            out["epoch"] = row["epoch"]
        return out

    def _student_tokens(self, ids: np.ndarray, t_start: np.ndarray, t_end: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The student's tokens of a teacher row (ids (T,), its tokens' byte offsets t_start, t_end (T,)) and their
        end offsets in the same bytes: each run of text between units tokenized on its own (a multi-byte character
        cut at the row's edge left out), a unit as the mapped student id. A run whose student tokens are not its
        bytes (a student normaliser rewrote it) keeps its tokens, all ending at the run's end: one unaligned chunk."""
        unit = self.unit[ids]
        edges = np.flatnonzero(np.diff(unit.astype(np.int8), prepend=2, append=2))     # where runs start and end
        runs = list(zip(edges[:-1], edges[1:]))
        texts = []                                                           # (bytes skipped, the run's text)
        for a, b in runs:
            if not unit[a]:
                data = b"".join(self.teacher.pieces[i] or b"" for i in ids[a:b])
                lead, trail = _utf8_edges(data)
                texts.append((lead, data[lead:len(data) - trail]))
        encoded = iter(self.tokenizer([t.decode("utf-8", errors="replace") for _, t in texts],
                                      add_special_tokens=False)["input_ids"] if texts else [])
        text = iter(texts)
        parts_ids, parts_end = [], []
        for a, b in runs:
            if unit[a]:
                parts_ids.append(self.vocab_map[ids[a:b]])
                parts_end.append(t_end[a:b])
                continue
            sids = np.asarray(next(encoded), np.int64)
            lead, middle = next(text)
            lengths = np.maximum(self.student.lengths[sids], 0)
            joined = self.student.join(sids)
            if joined == b" " + middle:
                lengths[0] -= 1                                              # a prefix space the student adds
            ends = t_start[a] + lead + np.cumsum(lengths)
            if joined not in (middle, b" " + middle):
                ends = np.full(len(sids), t_end[b - 1])
            parts_ids.append(sids)
            parts_end.append(ends)
        if not parts_ids:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        return np.concatenate(parts_ids), np.concatenate(parts_end).astype(np.int64)


def _merge_duplicates(ids: np.ndarray, lps: np.ndarray, at: np.ndarray) -> None:
    """Where two teacher ids mapped to one student id in a position's top-k, the first holds their summed
    probability and the other is dropped (-inf). ids (A, K) as mapped; lps (S, K), rows `at`, edited in place."""
    for row, a in zip(ids, at):
        live = np.isfinite(lps[a])
        if len(np.unique(row[live])) == live.sum():
            continue
        for k in np.flatnonzero(live):
            first = np.flatnonzero(live & (row == row[k]))[0]
            if first != k:
                lps[a, first] = np.logaddexp(lps[a, first], lps[a, k])
                lps[a, k] = -np.inf
