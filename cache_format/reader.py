"""Reading a cache: open_cache(path or URL) -> Cache; rows come back as dicts of numpy arrays."""

import hashlib
import os
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from . import storage
from .errors import CacheError
from .manifest import MANIFEST_NAME, TOKENIZER_NAME, Manifest, ShardInfo, read_manifest
from .schema import DOC_LENGTHS, SPLITS, codec_from_params, position_ids, shard_schema, supervised_positions


class Cache:
    """A finished cache. Every shard's sha256 is checked before its first read (once per Cache), its size before
    every read, and the CRC32 of every page read (written since page checksums were: a shard changed in place
    after its first read is named on the next read, never decoded).

    root: a Path for a local cache, else the URL (s3://..., see storage.py); messages name files under it."""

    def __init__(self, root: Path | str, manifest: Manifest):
        self.root = root
        self.manifest = manifest
        self.codec = codec_from_params(manifest.codec, manifest.top_k)
        self._fs, self._base = storage.resolve(root)
        self._checked: set[str] = set()

    @property
    def fingerprint(self) -> str:
        """sha256 of manifest.json: names this exact cache (its shards' checksums are inside)."""
        return hashlib.sha256(storage.read_bytes(self._fs, storage.join(self._base, MANIFEST_NAME))).hexdigest()

    def where(self, rel: str) -> str:
        """How messages name a file of the cache."""
        return str(self.root / rel) if isinstance(self.root, Path) else storage.join(self.root, rel)

    def domains(self, split: str = "train") -> list[str]:
        """Domains with at least one row in `split`, sorted by name."""
        _check_split(split)
        return sorted(d for d, info in self.manifest.splits.get(split, {}).items() if info.rows > 0)

    def shards(self, split: str, domain: str | None = None) -> list[ShardInfo]:
        _check_split(split)
        domains = self.manifest.splits.get(split, {})
        if domain is not None and domain not in domains:
            raise CacheError(f"{self.root}: no domain {domain!r} in split {split!r} "
                             f"(domains: {', '.join(sorted(domains)) or 'none'})")
        names = [domain] if domain is not None else sorted(domains)
        return [s for name in names for s in domains[name].shards]

    def check_shard_size(self, shard: ShardInfo) -> str:
        """The cheap check: the shard exists with the manifest's size. Returns its path in the filesystem."""
        path = storage.check_inside(self._fs, self._base, shard.path, self.where(shard.path))
        size = storage.size(self._fs, path)
        if size is None:
            raise CacheError(f"{self.where(shard.path)}: shard missing")
        if size != shard.bytes:
            raise CacheError(f"{self.where(shard.path)}: shard is {size} bytes, manifest says {shard.bytes} "
                             f"(truncated or replaced)")
        return path

    def check_shard(self, shard: ShardInfo) -> None:
        """Size + sha256 against the manifest (the sha256 once per Cache); raises CacheError naming the shard."""
        path = self.check_shard_size(shard)
        if shard.path in self._checked:
            return
        if storage.sha256(self._fs, path) != shard.sha256:
            raise CacheError(f"{self.where(shard.path)}: sha256 mismatch (shard corrupted)")
        self._checked.add(shard.path)

    def tokenizer_json(self) -> str | None:
        """The teacher tokenizer's tokenizer.json (text, for `tokenizers.Tokenizer.from_str`) after checking its
        sha256 against the manifest's; None for a cache that carries none (written before caches did).
        CacheError naming the file if it is missing or altered."""
        digest = self.manifest.tokenizer.file_sha256
        if not digest:
            return None
        where = self.where(TOKENIZER_NAME)
        path = storage.check_inside(self._fs, self._base, TOKENIZER_NAME, where)
        if storage.size(self._fs, path) is None:
            raise CacheError(f"{where}: missing (the manifest records its sha256)")
        data = storage.read_bytes(self._fs, path)
        if hashlib.sha256(data).hexdigest() != digest:
            raise CacheError(f"{where}: sha256 mismatch (the teacher's tokenizer file is corrupted or replaced)")
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as e:         # only with a manifest recording the digest of such bytes
            raise CacheError(f"{where}: not UTF-8 ({e})") from None

    def num_row_groups(self, shard: ShardInfo) -> int:
        """From the Parquet footer after the size check only: planning a read never hashes the whole shard."""
        return self._parquet(shard, verify=False).metadata.num_row_groups

    def read_row_group(self, shard: ShardInfo, index: int) -> Iterator[dict]:
        """Decoded rows of one row group (the unit a data loader schedules)."""
        self.check_shard(shard)
        where = self.where(shard.path)
        try:
            table = self._parquet(shard).read_row_group(index)
        except (OSError, pa.ArrowException) as e:
            raise CacheError(f"{where}: unreadable row group {index} ({e})") from None
        packing = self.manifest.packing
        if table.schema != shard_schema(self.codec, packing):
            raise CacheError(f"{where}: schema does not match codec {self.codec.name} with {packing} packing")
        doc_lengths = table.column(DOC_LENGTHS).to_pylist() if packing == "isolated" else [None] * table.num_rows
        for row, lengths in zip(self.codec.decode(table, where), doc_lengths):
            T = len(row["input_ids"])
            try:
                row["position_ids"] = position_ids(lengths, T)
            except CacheError as e:
                raise CacheError(f"{where}: row {row['row_index']}: {e}") from None
            row["supervised"] = supervised_positions(row["topk_logprobs"])
            yield row

    def iter_rows(self, split: str = "train", domain: str | None = None) -> Iterator[dict]:
        """Rows of `split` (one domain or all, in manifest order), dicts of:
            input_ids (T,) int32, topk_ids (T, K) int32, topk_logprobs (T, K) float32 (-inf padding after a
              position's entries; the top-1 first, the rest by descending log-prob (v1, v2) or by id (v3)),
            target_logprobs (T,) float32 (NaN where no distribution), domain str, row_index int,
            supervised (T,) bool: position t holds the teacher's distribution over token t+1 (text caches: every
              position but the last; chat caches: those whose next token is a trained one, e.g. the responses),
            position_ids (T,) int32: 0..T-1, or restarting at 0 at each document of an isolated-packed row."""
        for shard in self.shards(split, domain):
            for g in range(self.num_row_groups(shard)):
                yield from self.read_row_group(shard, g)

    def _parquet(self, shard: ShardInfo, verify: bool = True) -> pq.ParquetFile:
        if verify:
            self.check_shard(shard)
        else:
            self.check_shard_size(shard)
        try:
            return pq.ParquetFile(self._fs.open_input_file(storage.join(self._base, shard.path)),
                                  page_checksum_verification=True)      # a page changed since it was written
        except (OSError, pa.ArrowException) as e:
            raise CacheError(f"{self.where(shard.path)}: not a readable Parquet file ({e})") from None


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise CacheError(f"unknown split {split!r} (expected one of: {', '.join(SPLITS)})")


def open_cache(path: str | os.PathLike) -> Cache:
    """Open a finished cache (a local path or a URL, see storage.py); a directory without a valid manifest.json is
    refused with a CacheError."""
    root = Path(path) if "://" not in str(path) else str(path).rstrip("/")
    return Cache(root, read_manifest(root))
