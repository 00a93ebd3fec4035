"""verify_cache: every shard's checksum, schema and counts against the manifest, and the teacher's tokenizer.json
against its sha256; the first bad file is named."""

import os
from dataclasses import dataclass

from .errors import CacheError
from .reader import open_cache
from .schema import shard_schema


@dataclass(frozen=True)
class VerifyReport:
    shards: int
    rows: int
    tokens: int
    bytes: int


def verify_cache(path: str | os.PathLike) -> VerifyReport:
    """Raise CacheError at the first problem; return totals when the whole cache is sound."""
    cache = open_cache(path)
    m = cache.manifest
    cache.tokenizer_json()                      # the teacher's tokenizer.json, when the manifest records one
    shards = rows = tokens = nbytes = 0
    for split, domains in sorted(m.splits.items()):
        for domain, info in sorted(domains.items()):
            if sum(s.rows for s in info.shards) != info.rows or sum(s.tokens for s in info.shards) != info.tokens \
                    or sum(s.supervised for s in info.shards) != info.supervised_tokens:
                raise CacheError(f"{cache.root}/manifest.json: {split}/{domain} totals do not add up over its shards")
            for shard in info.shards:
                where = cache.where(shard.path)
                cache.check_shard(shard)
                pf = cache._parquet(shard)
                if pf.schema_arrow != shard_schema(cache.codec, m.packing):
                    raise CacheError(f"{where}: schema does not match codec {cache.codec.name} with {m.packing} "
                                     f"packing: {pf.schema_arrow}")
                if pf.metadata.num_rows != shard.rows:
                    raise CacheError(f"{where}: {pf.metadata.num_rows} rows, manifest says {shard.rows}")
                shard_tokens = shard_supervised = 0
                for g in range(pf.metadata.num_row_groups):
                    for row in cache.read_row_group(shard, g):
                        if row["domain"] != domain:
                            raise CacheError(f"{where}: row {row['row_index']} has domain {row['domain']!r}, "
                                             f"expected {domain!r}")
                        if len(row["input_ids"]) > m.seq_len:
                            raise CacheError(f"{where}: row {row['row_index']} is longer than seq_len={m.seq_len}")
                        shard_tokens += len(row["input_ids"])
                        shard_supervised += int(row["supervised"].sum())
                if shard_tokens != shard.tokens or shard_supervised != shard.supervised:
                    raise CacheError(f"{where}: {shard_tokens} tokens ({shard_supervised} supervised), manifest says "
                                     f"{shard.tokens} ({shard.supervised})")
                shards += 1
                rows += shard.rows
                tokens += shard.tokens
                nbytes += shard.bytes
    return VerifyReport(shards=shards, rows=rows, tokens=tokens, bytes=nbytes)
