"""ShardWriter: rows -> one zstd Parquet shard, written to a tmp file and renamed into place when complete."""

import hashlib
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .manifest import ShardInfo
from .schema import DOC_LENGTHS, TopkV1, TopkV2, TopkV3, shard_schema, supervised_positions


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


class ShardWriter:
    """Writes one shard. Every `row_group_rows` rows become one Parquet row group (the reader's unit).

    The file appears under its final name only after `close()`: a crash leaves at most a `*.tmp` file, which the
    next run overwrites. `close()` returns the ShardInfo (rows, tokens, supervised, bytes, sha256) for the manifest.
    packing "isolated": every row also gives `doc_lengths`, the lengths of its documents. compression_level: zstd's,
    by default the codec's (`zstd_level`).
    """

    def __init__(self, cache_dir: str | os.PathLike, rel_path: str, codec: TopkV1 | TopkV2 | TopkV3,
                 row_group_rows: int = 64, compression_level: int | None = None, packing: str = "concat"):
        self.cache_dir = Path(cache_dir)
        self.rel_path = rel_path
        self.codec = codec
        self.row_group_rows = row_group_rows
        self.packing = packing
        self.final_path = self.cache_dir / rel_path
        self.tmp_path = self.final_path.with_name(self.final_path.name + ".tmp")
        self.final_path.parent.mkdir(parents=True, exist_ok=True)
        self._writer = pq.ParquetWriter(self.tmp_path, shard_schema(codec, packing), compression="zstd",
                                        compression_level=codec.zstd_level if compression_level is None
                                        else compression_level,
                                        write_statistics=False,
                                        write_page_checksum=True)       # CRC32 per page, checked on every read
        self._pending: list[dict] = []
        self.rows = 0
        self.tokens = 0
        self.supervised = 0

    @property
    def bytes_written(self) -> int:
        """Bytes flushed to disk so far (used to rotate shards by size)."""
        return self.tmp_path.stat().st_size

    def write(self, row: dict) -> None:
        """Append one row: {row_index, domain, input_ids (T,), topk_ids (T,K), topk_logprobs (T,K) (-inf where a
        position has no distribution), target_logprobs (T,)} (+ doc_lengths for isolated packing)."""
        if self.packing == "isolated" and sum(row["doc_lengths"]) != len(row["input_ids"]):
            raise ValueError(f"row {row['row_index']}: doc_lengths add up to {sum(row['doc_lengths'])}, "
                             f"not its {len(row['input_ids'])} tokens")
        self._pending.append(row)
        self.rows += 1
        self.tokens += len(row["input_ids"])
        self.supervised += int(supervised_positions(row["topk_logprobs"]).sum())
        if len(self._pending) >= self.row_group_rows:
            self._flush()

    def _flush(self) -> None:
        if self._pending:
            table = self.codec.encode(self._pending)
            if self.packing == "isolated":
                lengths = [np.asarray(r["doc_lengths"], np.int32) for r in self._pending]
                table = table.append_column(DOC_LENGTHS, pa.array(lengths, pa.list_(pa.int32())))
            self._writer.write_table(table, row_group_size=len(self._pending))
            self._pending = []

    def close(self) -> ShardInfo:
        self._flush()
        self._writer.close()
        with open(self.tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        info = ShardInfo(path=self.rel_path, rows=self.rows, tokens=self.tokens, supervised=self.supervised,
                         bytes=self.tmp_path.stat().st_size, sha256=file_sha256(self.tmp_path))
        os.replace(self.tmp_path, self.final_path)
        return info

    def abort(self) -> None:
        self._writer.close()
        self.tmp_path.unlink(missing_ok=True)

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
