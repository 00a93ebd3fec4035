"""A shard changed in place after its first read (same size, bits flipped that still decode) is named on the next
read of that row group by the pages' CRC32, never decoded: a training run's second epoch is protected too."""

import pyarrow.parquet as pq
import pytest

from cache_format import CacheError, open_cache
from tests.helpers import write_synthetic_cache


def decoded(cache, shard, verify: bool):
    pf = pq.ParquetFile(cache.root / shard.path, page_checksum_verification=verify)
    return [row for g in range(pf.num_row_groups) for row in cache.codec.decode(pf.read_row_group(g), "x")]


def silent_flip(cache, shard) -> tuple[int, int]:
    """(offset, bit) of a flip in the shard's pages that an unchecked read decodes into other values."""
    path = cache.root / shard.path
    good = path.read_bytes()
    footer = int.from_bytes(good[-8:-4], "little") + 8
    before = decoded(cache, shard, False)
    for offset in range(len(good) - footer - 1, 4, -7):
        for bit in (0, 3, 6):
            path.write_bytes(good[:offset] + bytes([good[offset] ^ (1 << bit)]) + good[offset + 1:])
            try:
                after = decoded(cache, shard, False)
            except Exception:  # noqa: BLE001  this flip breaks the page: look for one that does not
                continue
            finally:
                path.write_bytes(good)
            if any((a["topk_logprobs"] != b["topk_logprobs"]).any() or (a["topk_ids"] != b["topk_ids"]).any()
                   for a, b in zip(after, before)):
                return offset, bit
    pytest.fail("no flip that still decodes was found")


def test_a_shard_changed_after_its_first_read_is_named_on_the_next(tmp_path):
    write_synthetic_cache(tmp_path / "cache", {"code": 6}, T=32, K=8, V=64)
    cache = open_cache(tmp_path / "cache")
    shard = cache.shards("train", "code")[0]
    offset, bit = silent_flip(cache, shard)
    first = list(cache.iter_rows("train"))                   # epoch 1: sha256 checked, then remembered
    path = tmp_path / "cache" / shard.path
    data = path.read_bytes()
    path.write_bytes(data[:offset] + bytes([data[offset] ^ (1 << bit)]) + data[offset + 1:])
    with pytest.raises(CacheError, match=f"{shard.path}: unreadable row group .*(CRC|checksum)"):
        list(cache.iter_rows("train"))                       # epoch 2: the same Cache, no second sha256
    path.write_bytes(data)
    assert len(list(cache.iter_rows("train"))) == len(first)
