"""Codec `topk-v2`: quantised, adaptive-k top-k (or sampled) teacher targets in per-row blobs (docs/cache_format.md).

Per position t the encoder keeps k_t <= K entries (all K, or the smallest prefix reaching `top_p` mass, or the
smallest prefix whose extra KL is within `kl_budget`, or within the row's `kl_scale` budget), then stores per row
of T positions, little-endian:
    input_ids  (T,)       token ids                                          id_width bytes (1, 2 or 4, from V)
    counts     (T,)       k_t; 0: no distribution (last, unsupervised)       count_width bytes (1; 2 when K > 255)
    ids        (sum k_t,) kept ids, each position's in descending-logprob order   id_width bytes
    values     topk: (sum k_t,) uint8 depth-code increments mod 256 along the row;  sampled: uint8 draw counts c
    tail       topk: (T,) uint16 code of log(tail mass / p_1);   sampled: empty
    slots      topk: (T,) the actual next token's slot among the kept ids, or no_slot;   sampled: empty
    targets    float16 log p of the actual next token where k_t > 0: topk where it has no slot, sampled at all
Depth code of entry j: round(SQRT_SCALE * sqrt(lp_1 - lp_j)), 0 for the top-1; codes above 254 (depth > 24.8
nats) are not kept. Decoding normalises with the tail, so the decoded head plus tail mass is exactly 1:
lp_j = -depth_j - log(sum_j exp(-depth_j) + exp(r_tail)). A row group decodes at once, without per-token Python.
"""

from dataclasses import dataclass
from typing import ClassVar, Iterator

import numpy as np
import pyarrow as pa

from .errors import CacheError

SQRT_SCALE = 51.0            # depth code = round(51 * sqrt(depth in nats)): finer near the top-1 (docs/benchmarks.md)
MAX_CODE = 254               # the deepest code kept: (254 / 51)^2 = 24.8 nats below the top-1
TAIL_STEP = 256.0            # tail code = round((log(tail / p_1) + 128) * 256), 0 = no tail mass
FIELDS = ("input_ids", "counts", "ids", "values", "tail", "slots", "targets")
CODES = np.arange(256)
DEPTH = ((CODES / SQRT_SCALE) ** 2).astype(np.float32)                    # (256,) code -> depth in nats
EXP_DEPTH = np.exp(-DEPTH.astype(np.float64)).astype(np.float32)          # (256,) code -> p_j / p_1


def _pack(values: np.ndarray, width: int) -> bytes:
    """Unsigned integers -> little-endian bytes of `width` (1, 2 or 4)."""
    return np.asarray(values).astype(f"<u{width}").tobytes()


def _unpack(offsets: np.ndarray, data: np.ndarray, width: int, where: str, field: str):
    """A binary column of per-row little-endian blobs -> (values (n,) of all rows in order, a view; per-row counts
    (R,)); CacheError naming the shard and field when a blob's length is not a multiple of width."""
    sizes = np.diff(offsets)                                                     # (R,) bytes per row
    if (sizes % width).any():
        raise CacheError(f"{where}: field {field!r} has a row of {sizes[sizes % width > 0][0]} bytes, "
                         f"not a multiple of {width}")
    return _concat(offsets, data).view(f"<u{width}"), sizes // width


def _concat(offsets: np.ndarray, data: np.ndarray) -> np.ndarray:
    """All rows' blobs of a binary column, concatenated (a view: they are contiguous)."""
    return data[offsets[0]:offsets[-1]]


def _binary_parts(column: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """A binary column -> (offsets (R+1,) int64, data uint8): row i is data[offsets[i]:offsets[i+1]], no copies."""
    arr = column.combine_chunks()
    if len(arr) == 0:
        return np.zeros(1, np.int64), np.zeros(0, np.uint8)
    _, offsets, data = arr.buffers()
    offsets = np.frombuffer(offsets, np.int32)[arr.offset:arr.offset + len(arr) + 1].astype(np.int64)
    return offsets, np.frombuffer(data, np.uint8) if data is not None else np.zeros(0, np.uint8)


def int_width(n: int) -> int:
    """Bytes per stored value below n: 1, 2 or 4 (not 3: zstd matches repeated values better on whole words)."""
    return 1 if n <= 1 << 8 else 2 if n <= 1 << 16 else 4


class BlobCodec:
    """What topk-v2 and topk-v3 share (a codec dataclass with top_k, vocab_size and a FIELDS tuple): per-row
    little-endian blobs, one binary column per field."""

    @property
    def id_width(self) -> int:
        """Bytes per stored token id."""
        return int_width(self.vocab_size)

    @property
    def count_width(self) -> int:
        return 1 if self.top_k <= 255 else 2

    @property
    def no_slot(self) -> int:
        """`slots` value of a position whose actual next token has no slot (or of a position without entries)."""
        return (1 << (8 * self.count_width)) - 1

    @property
    def arrow_schema(self) -> pa.Schema:
        return pa.schema([("row_index", pa.int64()), ("domain", pa.string())]
                         + [(f, pa.binary()) for f in self.FIELDS])

    def _check_top_k(self) -> None:
        if not 0 < self.top_k <= 65535 or self.vocab_size < self.top_k:
            raise CacheError(f"codec {self.name}: top_k {self.top_k} out of range (1..min(65535, vocab "
                             f"{self.vocab_size}))")

    def _table(self, rows: list[dict], blobs: list[dict]) -> pa.Table:
        """One Arrow table (a row group): the rows' row_index and domain, and each row's blob of every field."""
        return pa.Table.from_arrays(
            [pa.array([r["row_index"] for r in rows], pa.int64()), pa.array([r["domain"] for r in rows], pa.string())]
            + [pa.array([b[f] for b in blobs], pa.binary()) for f in self.FIELDS], schema=self.arrow_schema)

    @staticmethod
    def _rows(table: pa.Table, input_ids: np.ndarray, lengths: np.ndarray, arrays: dict) -> Iterator[dict]:
        """Cut the row group's decoded positions (input_ids (N,), arrays of N rows) into its rows (views)."""
        ends = np.cumsum(lengths)                                                                # (R,)
        row_index, domains = table.column("row_index").to_pylist(), table.column("domain").to_pylist()
        for i, (a, b) in enumerate(zip(ends - lengths, ends)):
            yield {"row_index": row_index[i], "domain": domains[i], "input_ids": input_ids[a:b],
                   **{key: v[a:b] for key, v in arrays.items()}}


def running_codes(offsets: np.ndarray, increments: np.ndarray) -> np.ndarray:
    """Depth codes (n,) uint8 from their increments mod 256, one running sum per row (row i: offsets[i:i+2])."""
    codes = np.empty(len(increments), np.uint8)
    for a, b in zip(offsets[:-1] - offsets[0], offsets[1:] - offsets[0]):
        np.cumsum(increments[a:b], dtype=np.uint8, out=codes[a:b])
    return codes


def depth_codes(lp: np.ndarray) -> np.ndarray:
    """Sorted log-probs (T, K) -> depth codes round(SQRT_SCALE * sqrt(lp_1 - lp)), (T, K) int64; 255 for -inf."""
    valid = np.isfinite(lp)
    depth = np.where(valid, np.where(valid[:, :1], lp[:, :1], 0.0) - np.where(valid, lp, 0.0), 0.0)
    return np.where(valid, np.minimum(np.rint(SQRT_SCALE * np.sqrt(np.maximum(depth, 0.0))), 255), 255).astype(np.int64)


def truncation_bound(lp: np.ndarray, vocab_size: int) -> float:
    """Mean over a row's positions with a full top-K (lp (T, K) sorted, -inf = none) of U_K = t_K log((V-K)
    min(p_K / t_K, 1)): the largest KL(p || p_K) that the top-K allows (its tail packed into entries of p_K).
    0.0 when no position has K entries."""
    K = lp.shape[1]
    full = np.isfinite(lp[:, -1])                                              # (T,)
    if not full.any():
        return 0.0
    p = np.exp(lp[full].astype(np.float64))                                    # (T', K)
    t_K = np.clip(1.0 - p.sum(1), 0.0, None)                                   # (T',)
    ratio = np.minimum(p[:, -1] / np.maximum(t_K, 1e-300), 1.0)
    return float(np.where(t_K > 0, t_K * np.log(np.maximum((vocab_size - K) * ratio, 1.0)), 0.0).mean())


def keep_counts(lp: np.ndarray, vocab_size: int, top_p: float | None, kl_budget: float | None,
                kl_scale: float | None = None) -> np.ndarray:
    """Entries to keep per position, (T,), from one row's sorted log-probs lp (T, K) (-inf = none).

    Always at least 1 where a distribution exists, never an entry deeper than the quantiser reaches. top_p: the
    smallest prefix with mass >= top_p. kl_budget: the smallest prefix k whose KL(p || p_k) exceeds KL(p || p_K) by
    at most kl_budget nats, p_k = the first k entries plus the rest of the mass spread uniformly over V - k ids:
        dKL(k) = sum_{k<i<=K} p_i log p_i - t_k log(t_k / (V-k)) + t_K log(t_K / (V-K)),   t_k = 1 - sum_{i<=k} p_i
    (computable from the top-K alone: the unknown tail terms cancel). kl_scale: the same rule with the row's budget
    kl_scale * mean_t U_K(t), U_K = t_K log((V-K) min(p_K / t_K, 1)) the largest KL(p || p_K) that the top-K allows
    (its tail packed into entries of p_K): a budget in proportion to the teacher's own truncation error.
    """
    T, K = lp.shape
    lp = lp.astype(np.float64)
    valid = np.isfinite(lp)                                                  # (T, K)
    kmax = (depth_codes(lp) <= MAX_CODE).sum(1)                              # (T,)
    p = np.where(valid, np.exp(lp), 0.0)                                     # (T, K)
    k = kmax.copy()
    if top_p is not None:
        reach = np.cumsum(p, 1) >= top_p                                      # (T, K)
        k = np.minimum(k, np.where(reach.any(1), reach.argmax(1) + 1, K))
    if kl_scale is not None and valid[:, -1].any():
        kl_budget = max(kl_budget or 0.0, kl_scale * truncation_bound(lp, vocab_size))   # rules combined: smallest k
    if kl_budget is not None:
        plogp = np.where(p > 0, p * np.where(valid, lp, 0.0), 0.0)            # (T, K)
        rest = plogp.sum(1, keepdims=True) - np.cumsum(plogp, 1)             # (T, K) sum_{k<i<=K}, k = 1..K
        t_K = np.clip(1.0 - p.sum(1), 0.0, None)                             # (T,)
        t = np.cumsum(p[:, ::-1], 1)[:, ::-1]                                 # (T, K) sum_{i>=k}, k = 1..K
        t = np.concatenate([t[:, 1:], np.zeros((T, 1))], 1) + t_K[:, None]  # (T, K) t_k for k = 1..K
        n_rest = vocab_size - np.arange(1, K + 1)                            # (K,)
        ent = lambda m, n: np.where(m > 0, m * np.log(np.maximum(m, 1e-300) / np.maximum(n, 1)), 0.0)  # noqa
        dkl = rest - ent(t, n_rest) + ent(t_K, vocab_size - K)[:, None]      # (T, K)
        ok = dkl <= kl_budget
        k = np.minimum(k, np.where(ok.any(1), ok.argmax(1) + 1, K))
    return np.where(valid[:, 0], np.maximum(k, 1), 0).astype(np.int64)


@dataclass(frozen=True)
class TopkV2(BlobCodec):
    """Quantised, adaptive-k codec (module docstring). targets: "topk" or "sampled" (N = samples draws)."""

    top_k: int
    vocab_size: int
    targets: str = "topk"
    top_p: float | None = None
    kl_budget: float | None = None
    kl_scale: float | None = None
    samples: int = 0
    name: str = "topk-v2"
    zstd_level: ClassVar[int] = 3           # Parquet's zstd level for its shards
    FIELDS: ClassVar[tuple[str, ...]] = FIELDS

    def __post_init__(self):
        if self.targets not in ("topk", "sampled"):
            raise CacheError(f"codec topk-v2: targets {self.targets!r} (expected topk or sampled)")
        if self.targets == "sampled" and not 0 < self.samples <= 255:
            raise CacheError(f"codec topk-v2: samples {self.samples} out of range (1..255)")
        self._check_top_k()

    def params(self) -> dict:
        return {"name": self.name, "vocab_size": self.vocab_size, "targets": self.targets, "top_p": self.top_p,
                "kl_budget": self.kl_budget, "kl_scale": self.kl_scale, "samples": self.samples}

    def encode(self, rows: list[dict]) -> pa.Table:
        """Rows (input_ids (T,), topk_ids (T, K), topk_logprobs (T, K) sorted descending, target_logprobs (T,),
        row_index, domain) -> one Arrow table (one Parquet row group). Sampled rows hold log(c / N)."""
        return self._table(rows, [self._encode_row(r) for r in rows])

    def _encode_row(self, r: dict) -> dict:
        ids, lp, target = r["topk_ids"], r["topk_logprobs"].astype(np.float64), r["target_logprobs"]
        T = len(r["input_ids"])
        if ids.shape != (T, self.top_k) or lp.shape != (T, self.top_k) or target.shape != (T,):
            raise ValueError(f"row {r['row_index']}: shapes {ids.shape}, {lp.shape}, {target.shape} do not match "
                             f"T={T}, K={self.top_k}")
        if self.targets == "sampled":
            counts = np.rint(np.exp(lp) * self.samples)                           # (T, K) 0 at -inf
            k = (counts > 0).sum(1)                                                # (T,)
            kept = np.arange(self.top_k) < k[:, None]                              # (T, K)
            values, tail, slots, out_targets = counts[kept], np.zeros(0), np.zeros(0), target[k > 0]
        else:
            k = keep_counts(lp, self.vocab_size, self.top_p, self.kl_budget, self.kl_scale)   # (T,)
            kept = np.arange(self.top_k) < k[:, None]                              # (T, K)
            with np.errstate(invalid="ignore"):                                    # -inf - -inf
                if (np.diff(lp, axis=1) > 0).any():
                    raise ValueError(f"row {r['row_index']}: topk_logprobs are not sorted in descending order")
            codes = depth_codes(lp)[kept]                                          # (n,) position after position
            values = np.diff(codes, prepend=0) % 256                               # (n,) uint8 wrap: cumsum decodes
            p = np.exp(lp)                                                         # (T, K) 0 at -inf
            tail_mass = np.where(kept, 0.0, p).sum(1) + np.clip(1.0 - p.sum(1), 0.0, None)  # (T,) dropped + beyond K
            with np.errstate(divide="ignore"):
                r_tail = np.log(tail_mass) - lp[:, 0]                              # (T,) -inf: no tail
            tail = np.where(np.isfinite(r_tail) & (k > 0),
                            np.clip(np.rint((r_tail + 128.0) * TAIL_STEP), 1, 65535), 0)
            hit = (ids[:-1] == r["input_ids"][1:, None]) & kept[:-1]               # (T-1, K)
            inside = np.append(hit.any(1), False)                                  # (T,)
            slots = np.where(inside, np.append(hit.argmax(1), 0), self.no_slot)   # (T,)
            out_targets = target[(k > 0) & ~inside]
        return {"input_ids": _pack(r["input_ids"], self.id_width), "counts": _pack(k, self.count_width),
                "ids": _pack(ids[kept], self.id_width), "values": values.astype(np.uint8).tobytes(),
                "tail": _pack(tail, 2), "slots": _pack(slots, self.count_width),
                "targets": out_targets.astype("<f2").tobytes()}

    def decode(self, table: pa.Table, where: str) -> Iterator[dict]:
        """One Arrow table (a row group) -> rows as dicts of numpy arrays (reader API, K = top_k). The whole row
        group is decoded at once as N = sum T positions, then cut into rows (views)."""
        if table.num_rows == 0:
            return
        parts = {f: _binary_parts(table.column(f)) for f in FIELDS}
        input_ids, lengths = _unpack(*parts["input_ids"], self.id_width, where, "input_ids")   # (N,), (R,)
        input_ids = input_ids.astype(np.int32)
        counts, n_counts = _unpack(*parts["counts"], self.count_width, where, "counts")       # (N,)
        counts = counts.astype(np.int64)
        if not np.array_equal(lengths, n_counts) or counts.max(initial=0) > self.top_k:
            raise CacheError(f"{where}: field 'counts' does not match the rows' lengths and top_k={self.top_k}")
        yield from self._rows(table, input_ids, lengths, self._decode_positions(counts, parts, where))

    def _decode_positions(self, counts, parts, where) -> dict:
        """N positions of concatenated rows -> topk_ids (N, K), topk_logprobs (N, K), target_logprobs (N,).
        Works on the n = sum counts kept entries (flat) and scatters them once into the padded (N, K) arrays;
        a position with no entries has no distribution and no target (NaN)."""
        K, N = self.top_k, len(counts)
        flat_ids, _ = _unpack(*parts["ids"], self.id_width, where, "ids")                    # (n,)
        (v_offsets, v_data), targets = parts["values"], _concat(*parts["targets"])
        values = _concat(v_offsets, v_data)                                                     # (n,) uint8
        n = int(counts.sum())
        if len(flat_ids) != n or len(values) != n or targets.size % 2:
            raise CacheError(f"{where}: field 'ids', 'values' or 'targets' does not match the counts")
        targets = targets.view("<f2")
        kept = np.arange(K) < counts[:, None]                                                   # (N, K)
        empty = counts == 0                                                                     # (N,)
        ids = np.zeros((N, K), np.int32)
        ids[kept] = flat_ids
        lp = np.full((N, K), -np.inf, np.float32)
        target = np.full(N, np.nan, np.float32)                                                 # (N,)
        if self.targets == "sampled":
            if len(targets) != int((~empty).sum()):
                raise CacheError(f"{where}: field 'targets' does not match the counts")
            lp[kept] = np.log(values.astype(np.float32) / self.samples)
            target[~empty] = targets
            return {"topk_ids": ids, "topk_logprobs": lp, "target_logprobs": target}
        tail_code, _ = _unpack(*parts["tail"], 2, where, "tail")                              # (N,)
        slots, _ = _unpack(*parts["slots"], self.count_width, where, "slots")                 # (N,)
        if len(tail_code) != N or len(slots) != N:
            raise CacheError(f"{where}: field 'tail' or 'slots' does not match the rows' lengths")
        codes = running_codes(v_offsets, values)                                                # (n,) depth codes
        if n and codes.max() > MAX_CODE:
            raise CacheError(f"{where}: field 'values' decodes to a depth code above {MAX_CODE}")
        first = np.cumsum(counts)[counts > 0] - counts[counts > 0]                               # first entries
        head = np.zeros(N, np.float32)                                                          # (N,) sum p_j / p_1
        if n:
            head[counts > 0] = np.add.reduceat(EXP_DEPTH[codes], first)
        tail_rel = np.where(tail_code > 0, np.exp(tail_code / TAIL_STEP - 128.0), 0.0)         # (N,) tail / p_1
        norm = np.log(np.where(counts > 0, head + tail_rel, 1.0)).astype(np.float32)           # (N,) -log p_1
        lp[kept] = -DEPTH[codes]
        lp -= norm[:, None]
        inside = slots < np.minimum(counts, self.no_slot)                                      # (N,)
        if int((~inside & ~empty).sum()) != len(targets):
            raise CacheError(f"{where}: field 'targets' has {len(targets)} values, expected "
                             f"{int((~inside & ~empty).sum())}")
        target[inside] = lp[inside, slots[inside]]
        target[~inside & ~empty] = targets
        return {"topk_ids": ids, "topk_logprobs": lp, "target_logprobs": target}
