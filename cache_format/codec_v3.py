"""Codec `topk-v3`: the whole top-k listed, values only where they matter (docs/cache_format.md).

Per position t the encoder lists the L_t <= K ids whose depth code the quantiser reaches (topk-v2's
round(51 sqrt(lp_1 - lp)) <= 254) and gives its own depth code to only the first k_t <= L_t of them (by log-prob):
the smallest k_t whose extra KL is within the rule's budget when the other L_t - k_t listed ids, the *shared* ids,
split their mass equally (`value_counts`). Per row of T positions, little-endian:
    input_ids   (T,)             token ids                                              id_width bytes (1, 2 or 4)
    counts      (T,)             L_t; 0: no distribution (last, unsupervised)           count_width bytes
    valued      (T,)             k_t (1..L_t where L_t > 0)                             count_width bytes
    dictionary  (D,)             first row of a row group only: the D distinct listed ids of the row group,
                                 ascending, as differences (the first from 0)           id_width bytes
    ids         (sum L_t,)       listed ids, each position's in ascending id order, as dictionary indices
                                                                                        1, 2 or 4 bytes (from D)
    valued_at   (sum k_t,)       where each valued id is in its position's ids, in descending-logprob order
                                                                                        count_width bytes
    values      (sum k_t,)       uint8 depth-code increments mod 256 along the row (topk-v2's)
    shared      (T,)             uint8 depth code of each shared id of the position
    tail        (T,)             uint16 code of log(mass beyond the listed ids / p_1) (topk-v2's)
    slots       (T,)             where the actual next token is in the position's ids when it is valued, else no_slot
    targets     float16 log p of the actual next token where L_t > 0 and it has no slot
Why this layout (measured, docs/benchmarks.md): a teacher's top-k *sets* recur from position to position, so sorted
they form long repeats that zstd finds (about 2.5 bits per id instead of 9-10 in log-prob order); the dictionary
makes those repeats as short at V = 262k as at V = 4k; and the flat part of a distribution, most of its entries,
costs one shared code instead of one per entry. Decoded, a position's entries come in ascending id order except
that the top-1 comes first (swapped with the id in slot 0): unlike topk-v1 and v2, the log-probs after slot 0 are
not sorted (every kdcache loss is order-free). Head plus tail mass is exactly 1, as in topk-v2.
"""

from dataclasses import dataclass
from typing import ClassVar, Iterator

import numpy as np
import pyarrow as pa

from .codec_v2 import DEPTH, EXP_DEPTH, MAX_CODE, SQRT_SCALE, TAIL_STEP, BlobCodec, _binary_parts, _concat, _pack, \
    _unpack, depth_codes, int_width, running_codes, truncation_bound
from .errors import CacheError

FIELDS = ("input_ids", "counts", "valued", "dictionary", "ids", "valued_at", "values", "shared", "tail", "slots",
          "targets")


def value_counts(lp: np.ndarray, listed: np.ndarray, vocab_size: int, kl_budget: float | None,
                 kl_scale: float | None) -> np.ndarray:
    """Valued entries per position, (T,), from one row's sorted log-probs lp (T, K) and its listed counts L (T,).

    Decoding gives the listed ids k < j <= L the same probability m_k / (L - k), m_k = sum_{k<j<=L} p_j, so the
    KL(p || decoded) exceeds that of all L valued by
        dKL(k) = sum_{k<j<=L} p_j log p_j - m_k log(m_k / (L - k))          (0 at k = L)
    The smallest k with dKL(k) <= budget is kept: kl_budget nats, or kl_scale times the row's mean U_K, topk-v2's
    bound on the top-K truncation KL (`truncation_bound`); the larger of the two (the smaller k) when both are
    given; no rule: every listed id valued. At least 1 where a distribution exists.
    """
    T, K = lp.shape
    lp = lp.astype(np.float64)
    if kl_budget is None and kl_scale is None:
        return listed.copy()
    if kl_scale is not None:
        scaled = kl_scale * truncation_bound(lp, vocab_size)
        kl_budget = scaled if kl_budget is None else max(kl_budget, scaled)
    p = np.where(np.arange(K) < listed[:, None], np.exp(lp), 0.0)              # (T, K) listed entries only
    plogp = np.where(p > 0, p * np.where(np.isfinite(lp), lp, 0.0), 0.0)      # (T, K)
    rest = plogp.sum(1, keepdims=True) - np.cumsum(plogp, 1)                   # (T, K) sum_{k<j<=L} p_j log p_j
    m = p.sum(1, keepdims=True) - np.cumsum(p, 1)                              # (T, K) m_k, k = 1..K
    n = np.maximum(listed[:, None] - np.arange(1, K + 1), 1)                   # (T, K) L - k
    dkl = rest - np.where(m > 0, m * np.log(np.maximum(m, 1e-300) / n), 0.0)
    ok = (dkl <= kl_budget) | (np.arange(1, K + 1) >= listed[:, None])         # (T, K) k = L always qualifies
    return np.where(listed > 0, np.maximum(ok.argmax(1) + 1, 1), 0).astype(np.int64)


@dataclass(frozen=True)
class TopkV3(BlobCodec):
    """Every listed id in one sorted list, own codes only for the first k_t by log-prob, one shared code for the
    rest (module docstring). Top-k targets only (sampled targets: topk-v2)."""

    top_k: int
    vocab_size: int
    kl_budget: float | None = None
    kl_scale: float | None = None
    name: str = "topk-v3"
    zstd_level: ClassVar[int] = 9           # sorted ids repeat at long range: 9 finds 15 % more than 3 (benchmarks)
    FIELDS: ClassVar[tuple[str, ...]] = FIELDS

    def __post_init__(self):
        self._check_top_k()
        for rule in (self.kl_budget, self.kl_scale):
            if rule is not None and not rule >= 0:
                raise CacheError(f"codec topk-v3: kl_budget/kl_scale must be >= 0, got {rule}")

    def params(self) -> dict:
        return {"name": self.name, "vocab_size": self.vocab_size, "kl_budget": self.kl_budget,
                "kl_scale": self.kl_scale}

    def encode(self, rows: list[dict]) -> pa.Table:
        """Rows (input_ids (T,), topk_ids (T, K), topk_logprobs (T, K) sorted descending, target_logprobs (T,),
        row_index, domain) -> one Arrow table (one Parquet row group)."""
        encoded = [self._encode_row(r) for r in rows]
        dictionary = np.unique(np.concatenate([e["ids"] for e in encoded] + [np.zeros(0, np.int64)]))   # (D,)
        if dictionary[-1:].max(initial=0) >= self.vocab_size:
            raise ValueError(f"row group of row {rows[0]['row_index']}: id {dictionary[-1]} is not below "
                             f"vocab_size={self.vocab_size}")
        width = int_width(len(dictionary))
        index_of = np.zeros(self.vocab_size, np.int64)                             # (V,) id -> dictionary index
        index_of[dictionary] = np.arange(len(dictionary))
        for i, e in enumerate(encoded):
            e["ids"] = _pack(index_of[e["ids"]], width)
            e["dictionary"] = _pack(np.diff(dictionary, prepend=0), self.id_width) if i == 0 else b""
        return self._table(rows, encoded)

    def _encode_row(self, r: dict) -> dict:
        ids, lp, target = r["topk_ids"].astype(np.int64), r["topk_logprobs"].astype(np.float64), r["target_logprobs"]
        T, K = len(r["input_ids"]), self.top_k
        if ids.shape != (T, K) or lp.shape != (T, K) or target.shape != (T,):
            raise ValueError(f"row {r['row_index']}: shapes {ids.shape}, {lp.shape}, {target.shape} do not match "
                             f"T={T}, K={K}")
        with np.errstate(invalid="ignore"):                                        # -inf - -inf
            if (np.diff(lp, axis=1) > 0).any():
                raise ValueError(f"row {r['row_index']}: topk_logprobs are not sorted in descending order")
        codes = depth_codes(lp)                                                    # (T, K) 255 at -inf
        listed_n = np.where(np.isfinite(lp[:, 0]), (codes <= MAX_CODE).sum(1), 0)  # (T,) L_t
        valued_n = value_counts(lp, listed_n, self.vocab_size, self.kl_budget, self.kl_scale)   # (T,) k_t
        col = np.arange(K)
        listed, valued = col < listed_n[:, None], col < valued_n[:, None]          # (T, K)
        shared_mask = listed & ~valued                                             # (T, K)
        p = np.where(listed, np.exp(lp), 0.0)                                      # (T, K)
        share = np.where(shared_mask, p, 0.0).sum(1) / np.maximum(listed_n - valued_n, 1)   # (T,)
        with np.errstate(divide="ignore", invalid="ignore"):                       # rows without a distribution
            shared = np.where(share > 0, np.rint(SQRT_SCALE * np.sqrt(np.maximum(lp[:, 0] - np.log(share), 0.0))),
                              0)
        shared = np.minimum(shared, MAX_CODE)                                      # (T,)
        beyond = np.clip(1.0 - p.sum(1), 0.0, None)                                # (T,) mass beyond the listed ids
        with np.errstate(divide="ignore"):
            r_tail = np.log(beyond) - lp[:, 0]                                     # (T,) -inf: no tail
        tail = np.where(np.isfinite(r_tail) & (listed_n > 0),
                        np.clip(np.rint((r_tail + 128.0) * TAIL_STEP), 1, 65535), 0)
        order = np.argsort(np.where(listed, ids, np.iinfo(np.int64).max), axis=1, kind="stable")   # (T, K)
        at = np.empty_like(order)                                                  # (T, K) entry j's place sorted
        np.put_along_axis(at, order, col, axis=1)                                  # (the inverse permutation)
        hit = (ids[:-1] == r["input_ids"][1:, None]) & valued[:-1]                # (T-1, K)
        inside = np.append(hit.any(1), False)                                      # (T,)
        slots = np.where(inside, np.append(np.take_along_axis(at[:-1], hit.argmax(1)[:, None], 1)[:, 0], 0),
                         self.no_slot)                                             # (T,) place among the sorted ids
        return {"input_ids": _pack(r["input_ids"], self.id_width), "counts": _pack(listed_n, self.count_width),
                "valued": _pack(valued_n, self.count_width),
                "ids": np.take_along_axis(ids, order, 1)[listed], "valued_at": _pack(at[valued], self.count_width),
                "values": (np.diff(codes[valued], prepend=0) % 256).astype(np.uint8).tobytes(),
                "shared": shared.astype(np.uint8).tobytes(), "tail": _pack(tail, 2),
                "slots": _pack(slots, self.count_width),
                "targets": target[(listed_n > 0) & ~inside].astype("<f2").tobytes()}

    def decode(self, table: pa.Table, where: str) -> Iterator[dict]:
        """One Arrow table (a row group) -> rows as dicts of numpy arrays (reader API, K = top_k), decoded at once
        as N = sum T positions and cut into rows (views)."""
        if table.num_rows == 0:
            return
        parts = {f: _binary_parts(table.column(f)) for f in FIELDS}
        input_ids, lengths = _unpack(*parts["input_ids"], self.id_width, where, "input_ids")   # (N,), (R,)
        counts, n_counts = _unpack(*parts["counts"], self.count_width, where, "counts")       # (N,) L_t
        valued, n_valued = _unpack(*parts["valued"], self.count_width, where, "valued")       # (N,) k_t
        counts, valued = counts.astype(np.int64), valued.astype(np.int64)
        if not np.array_equal(lengths, n_counts) or counts.max(initial=0) > self.top_k:
            raise CacheError(f"{where}: field 'counts' does not match the rows' lengths and top_k={self.top_k}")
        if not np.array_equal(lengths, n_valued) or (valued > counts).any() or ((valued == 0) != (counts == 0)).any():
            raise CacheError(f"{where}: field 'valued' does not match the rows' lengths and counts")
        yield from self._rows(table, input_ids.astype(np.int32), lengths,
                              self._decode_positions(counts, valued, parts, where))

    def _decode_positions(self, counts: np.ndarray, valued: np.ndarray, parts: dict, where: str) -> dict:
        """N positions -> topk_ids (N, K), topk_logprobs (N, K), target_logprobs (N,): each position's sorted ids
        fill its row (a block copy when every position lists K ids) with the shared value, the valued entries'
        values are scattered over it, and the top-1 is swapped into slot 0."""
        K, N = self.top_k, len(counts)
        deltas, _ = _unpack(*parts["dictionary"], self.id_width, where, "dictionary")
        dictionary = np.cumsum(deltas, dtype=np.int64)                                          # (D,)
        if (deltas[1:] == 0).any() or dictionary[-1:].max(initial=0) >= self.vocab_size:
            raise CacheError(f"{where}: field 'dictionary' is not a set of ids below vocab_size={self.vocab_size}")
        index, _ = _unpack(*parts["ids"], int_width(len(dictionary)), where, "ids")        # (l,) sorted lists
        valued_at, _ = _unpack(*parts["valued_at"], self.count_width, where, "valued_at")     # (n,)
        (v_offsets, v_data), targets = parts["values"], _concat(*parts["targets"])
        increments = _concat(v_offsets, v_data)                                                 # (n,) uint8
        shared = _concat(*parts["shared"])                                                      # (N,) uint8
        tail_code, _ = _unpack(*parts["tail"], 2, where, "tail")                              # (N,)
        slots, _ = _unpack(*parts["slots"], self.count_width, where, "slots")                 # (N,)
        n, n_listed = int(valued.sum()), int(counts.sum())
        if len(index) != n_listed or len(valued_at) != n or len(increments) != n or targets.size % 2:
            raise CacheError(f"{where}: field 'ids', 'valued_at', 'values' or 'targets' does not match the counts")
        if len(shared) != N or len(tail_code) != N or len(slots) != N:
            raise CacheError(f"{where}: field 'shared', 'tail' or 'slots' does not match the rows' lengths")
        if index.max(initial=0) >= max(len(dictionary), 1):
            raise CacheError(f"{where}: field 'ids' points past the {len(dictionary)} ids of the dictionary")
        listed_ids = dictionary.astype(np.int32)[index]                                        # (l,)
        if (valued_at >= np.repeat(counts, valued)).any():
            raise CacheError(f"{where}: field 'valued_at' points past its position's ids")
        codes = running_codes(v_offsets, increments)                                            # (n,) depth codes
        if max(codes.max(initial=0), shared.max(initial=0)) > MAX_CODE:
            raise CacheError(f"{where}: field 'values' or 'shared' holds a depth code above {MAX_CODE}")
        live = counts > 0                                                                       # (N,)
        head = np.zeros(N, np.float64)                                                          # (N,) sum p_j / p_1
        if n:
            head[live] = np.add.reduceat(EXP_DEPTH[codes], (np.cumsum(valued) - valued)[live])
        head += (counts - valued) * EXP_DEPTH[shared]
        tail_rel = np.where(tail_code > 0, np.exp(tail_code / TAIL_STEP - 128.0), 0.0)         # (N,) tail / p_1
        norm = np.log(np.where(live, head + tail_rel, 1.0)).astype(np.float32)                 # (N,) -log p_1
        col = np.arange(K)
        ids = np.zeros((N, K), np.int32)
        lp = np.full((N, K), -np.inf, np.float32)
        full = counts == K                                                                      # (N,) the usual case
        if full.sum() == live.sum():
            ids[full] = listed_ids.reshape(-1, K)
            lp[full] = (-DEPTH[shared] - norm)[full, None]
        else:
            in_list = col < counts[:, None]                                                     # (N, K)
            ids[in_list] = listed_ids
            lp[in_list] = np.repeat(-DEPTH[shared] - norm, counts)
        at = np.repeat(np.arange(N) * K, valued) + valued_at                                   # (n,) flat (N, K)
        lp.reshape(-1)[at] = -DEPTH[codes] - np.repeat(norm, valued)
        picked = np.zeros(N * K, bool)
        picked[at] = True
        if int(picked.sum()) != n:
            raise CacheError(f"{where}: field 'valued_at' does not pick distinct ids of a position")
        inside = slots < np.minimum(counts, self.no_slot)                                      # (N,)
        target = np.full(N, np.nan, np.float32)                                                 # (N,)
        if int((~inside & live).sum()) * 2 != targets.size:
            raise CacheError(f"{where}: field 'targets' has {targets.size // 2} values, expected "
                             f"{int((~inside & live).sum())}")
        target[inside] = lp[inside, slots[inside]]
        target[~inside & live] = targets.view("<f2")
        top = np.flatnonzero(live)                                                              # the top-1 first
        j = valued_at[(np.cumsum(valued) - valued)[live]].astype(np.int64)                     # (N',) its place
        for a in (ids, lp):
            a[top, 0], a[top, j] = a[top, j], a[top, 0]
        return {"topk_ids": ids, "topk_logprobs": lp, "target_logprobs": target}
