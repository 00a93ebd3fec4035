"""Cache format constants and codec v1: how one row's arrays map to Parquet columns.

A row is one packed sequence of T tokens. Position t holds the teacher's distribution over the token at t+1;
the last position of a row holds none (its top-k slots are padding and its target logprob is NaN).

Codec `topk-v1` stores every array flat in a list column:
    input_ids        list<int32>    (T,)
    topk_ids         list<int32>    (T*K,)  row-major (T, K), ids sorted by descending logprob
    topk_logprobs    list<float32>  (T*K,)  log p at temperature 1, full-vocabulary normalised; -inf = padding
    target_logprobs  list<float32>  (T,)    log p of the actual next token (even outside the top-k); NaN at T-1
plus `row_index int64` (the row's position in its split/domain stream) and `domain string`.

Every codec marks a position without a teacher distribution by -inf logprobs (and NaN target): the last position of
a row, and in a chat cache every position that is not *supervised* (its next token is not a trained token). A cache
packed with `isolated` documents adds one column, `doc_lengths list<int32>`: the lengths of the row's documents,
whose positions restart at 0 (`position_ids`).
"""

import re
from dataclasses import dataclass
from typing import ClassVar, Iterator

import numpy as np
import pyarrow as pa

from .codec_v2 import TopkV2
from .codec_v3 import TopkV3
from .errors import CacheError

FORMAT_NAME = "kdcache"
FORMAT_VERSION = 1
SPLITS = ("train", "val")
PACKINGS = ("concat", "isolated")   # documents joined into one stream / kept apart (restarting positions)
DOC_LENGTHS = "doc_lengths"


# what a domain may be called (it names a directory of the cache) and a shard's path: {split}/{domain}/shard-N
DOMAIN_NAME = re.compile(r"[A-Za-z0-9_.-]+")
SHARD_NAME = re.compile(r"shard-[0-9]{5,}\.parquet")


def is_domain_name(name) -> bool:
    """A domain name is letters, digits, '_', '.', '-', and not "." or ".."."""
    return isinstance(name, str) and bool(DOMAIN_NAME.fullmatch(name)) and name not in (".", "..")


def shard_schema(codec: "TopkV1 | TopkV2 | TopkV3", packing: str) -> pa.Schema:
    """The Parquet schema of a cache's shards: the codec's columns, plus `doc_lengths` for isolated packing."""
    if packing == "isolated":
        return codec.arrow_schema.append(pa.field(DOC_LENGTHS, pa.list_(pa.int32())))
    return codec.arrow_schema


def position_ids(doc_lengths, T: int) -> np.ndarray:
    """(T,) int32 positions restarting at 0 at each document; doc_lengths None: 0..T-1 (one stream)."""
    if doc_lengths is None:
        return np.arange(T, dtype=np.int32)
    lengths = np.asarray(doc_lengths, np.int64)
    if lengths.sum() != T or (lengths < 1).any():
        raise CacheError(f"doc_lengths {lengths.tolist()} do not add up to the row's {T} tokens")
    starts = np.repeat(np.cumsum(lengths) - lengths, lengths)                     # (T,) each token's doc start
    return (np.arange(T) - starts).astype(np.int32)


def supervised_positions(topk_logprobs: np.ndarray) -> np.ndarray:
    """(T,) bool: the positions that hold a teacher distribution, from topk_logprobs (T, K) (-inf where none)."""
    return np.isfinite(topk_logprobs[:, 0])


@dataclass(frozen=True)
class TopkV1:
    """Plain top-k: int32 ids + float32 logprobs, zstd-compressed by Parquet."""

    top_k: int
    name: str = "topk-v1"
    zstd_level: ClassVar[int] = 3

    @property
    def arrow_schema(self) -> pa.Schema:
        return pa.schema([
            ("row_index", pa.int64()),
            ("domain", pa.string()),
            ("input_ids", pa.list_(pa.int32())),
            ("topk_ids", pa.list_(pa.int32())),
            ("topk_logprobs", pa.list_(pa.float32())),
            ("target_logprobs", pa.list_(pa.float32())),
        ])

    def params(self) -> dict:
        return {"name": self.name}

    def encode(self, rows: list[dict]) -> pa.Table:
        """Rows as returned by `decode` (plus `row_index`) -> one Arrow table (one Parquet row group)."""
        K = self.top_k
        for r in rows:
            T = len(r["input_ids"])
            if (r["topk_ids"].shape != (T, K) or r["topk_logprobs"].shape != (T, K)
                    or r["target_logprobs"].shape != (T,)):
                raise ValueError(f"row {r['row_index']}: shapes {r['topk_ids'].shape}, {r['topk_logprobs'].shape}, "
                                 f"{r['target_logprobs'].shape} do not match T={T}, K={K}")

        def flat_list(key: str, dtype) -> pa.ListArray:
            parts = [np.ascontiguousarray(r[key], dtype=dtype).reshape(-1) for r in rows]
            lengths = np.array([len(p) for p in parts], dtype=np.int32)
            offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
            values = np.concatenate(parts) if parts else np.zeros(0, dtype)
            return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))

        return pa.Table.from_arrays([
            pa.array([r["row_index"] for r in rows], pa.int64()),
            pa.array([r["domain"] for r in rows], pa.string()),
            flat_list("input_ids", np.int32),
            flat_list("topk_ids", np.int32),
            flat_list("topk_logprobs", np.float32),
            flat_list("target_logprobs", np.float32),
        ], schema=self.arrow_schema)

    def decode(self, table: pa.Table, where: str) -> Iterator[dict]:
        """One Arrow table (a row group) -> rows as dicts of numpy arrays. `where` names the shard in errors."""
        K = self.top_k
        table = table.combine_chunks()
        cols = {name: table.column(name).chunk(0) if table.num_rows else None for name in table.column_names}
        if table.num_rows == 0:
            return
        offsets = cols["input_ids"].offsets.to_numpy()                   # (R+1,)
        input_ids = cols["input_ids"].values.to_numpy(zero_copy_only=False)
        topk_ids = cols["topk_ids"].values.to_numpy(zero_copy_only=False)
        topk_logprobs = cols["topk_logprobs"].values.to_numpy(zero_copy_only=False)
        target_logprobs = cols["target_logprobs"].values.to_numpy(zero_copy_only=False)
        if (len(topk_ids) != K * len(input_ids) or len(topk_logprobs) != K * len(input_ids)
                or len(target_logprobs) != len(input_ids)):
            raise CacheError(f"{where}: column lengths do not match top_k={K} and the input_ids lengths")
        row_index = cols["row_index"].to_numpy()
        domains = cols["domain"].to_pylist()
        for i in range(table.num_rows):
            a, b = int(offsets[i]), int(offsets[i + 1])
            yield {
                "row_index": int(row_index[i]),
                "domain": domains[i],
                "input_ids": input_ids[a:b],                                # (T,)
                "topk_ids": topk_ids[a * K:b * K].reshape(b - a, K),         # (T, K)
                "topk_logprobs": topk_logprobs[a * K:b * K].reshape(b - a, K),  # (T, K)
                "target_logprobs": target_logprobs[a:b],                    # (T,)
            }


def codec_from_params(params: dict, top_k: int) -> "TopkV1 | TopkV2 | TopkV3":
    """The codec a manifest names; an unknown name or bad parameters are a clear CacheError."""
    name = params.get("name")
    if name == "topk-v1":
        return TopkV1(top_k=top_k)
    if name in ("topk-v2", "topk-v3"):
        try:
            return (TopkV2 if name == "topk-v2" else TopkV3)(top_k=top_k, **{k: v for k, v in params.items()
                                                                            if k != "name"})
        except TypeError as e:
            raise CacheError(f"codec {name}: bad parameters {params} ({e})") from None
    raise CacheError(f"unknown codec {name!r} (this kdcache reads: topk-v1, topk-v2, topk-v3)")
