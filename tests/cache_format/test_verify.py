import json
import shutil

import pytest

from cache_format import CacheError, open_cache, verify_cache
from tests.helpers import write_synthetic_cache


def first_shard(cache_dir):
    return cache_dir / open_cache(cache_dir).manifest.splits["train"]["code"].shards[0].path


def test_sound_cache_verifies(synthetic_cache):
    report = verify_cache(synthetic_cache)
    assert report.rows == 7 + 4 + 2 + 2 and report.tokens == report.rows * 16 and report.shards == 5


def test_missing_dir_and_manifest(tmp_path):
    with pytest.raises(CacheError, match="no such cache directory"):
        open_cache(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CacheError, match="no manifest.json"):
        open_cache(tmp_path / "empty")
    (tmp_path / "file").write_text("x")
    with pytest.raises(CacheError, match="not a directory"):
        open_cache(tmp_path / "file")


def test_malformed_manifest(synthetic_cache):
    (synthetic_cache / "manifest.json").write_text("{not json")
    with pytest.raises(CacheError, match="manifest.json: malformed JSON"):
        open_cache(synthetic_cache)


def test_future_format_version_refused(synthetic_cache):
    path = synthetic_cache / "manifest.json"
    d = json.loads(path.read_text())
    d["format_version"] = 99
    path.write_text(json.dumps(d))
    with pytest.raises(CacheError, match="format_version 99 is not supported"):
        open_cache(synthetic_cache)


def test_missing_field_named(synthetic_cache):
    path = synthetic_cache / "manifest.json"
    d = json.loads(path.read_text())
    del d["top_k"]
    path.write_text(json.dumps(d))
    with pytest.raises(CacheError, match="missing field 'top_k'"):
        open_cache(synthetic_cache)


def test_missing_shard(synthetic_cache):
    shard = first_shard(synthetic_cache)
    shard.unlink()
    with pytest.raises(CacheError, match=f"{shard}: shard missing"):
        verify_cache(synthetic_cache)


def test_truncated_shard(synthetic_cache):
    shard = first_shard(synthetic_cache)
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(CacheError, match=f"{shard}: shard is .* bytes, manifest says"):
        verify_cache(synthetic_cache)
    with pytest.raises(CacheError, match="truncated"):        # the reader refuses it too, before decoding
        list(open_cache(synthetic_cache).iter_rows("train", "code"))


def test_flipped_byte(synthetic_cache):
    shard = first_shard(synthetic_cache)
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CacheError, match=f"{shard}: sha256 mismatch"):
        verify_cache(synthetic_cache)
    with pytest.raises(CacheError, match="sha256 mismatch"):
        next(open_cache(synthetic_cache).iter_rows("train"))


def test_schema_mismatch_named(tmp_path):
    """A shard with the right checksum in the manifest but another schema (e.g. a v2 shard under a v1 manifest)."""
    import pyarrow.parquet as pq
    from cache_format import file_sha256

    write_synthetic_cache(tmp_path / "c", {"code": 3})
    cache_dir = tmp_path / "c"
    manifest = json.loads((cache_dir / "manifest.json").read_text())
    shard = manifest["splits"]["train"]["code"]["shards"][0]
    path = cache_dir / shard["path"]
    table = pq.read_table(path).drop_columns(["target_logprobs"])
    pq.write_table(table, path)
    shard.update(bytes=path.stat().st_size, sha256=file_sha256(path))
    (cache_dir / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CacheError, match=f"{path}: schema does not match codec topk-v1"):
        verify_cache(cache_dir)


def test_row_count_mismatch_named(synthetic_cache):
    path = synthetic_cache / "manifest.json"
    d = json.loads(path.read_text())
    d["splits"]["train"]["code"]["shards"][0]["rows"] += 1
    d["splits"]["train"]["code"]["rows"] += 1
    path.write_text(json.dumps(d))
    with pytest.raises(CacheError, match="rows, manifest says"):
        verify_cache(synthetic_cache)


def test_copied_cache_still_verifies(synthetic_cache, tmp_path):
    """Shard paths are relative: a cache can be moved."""
    shutil.copytree(synthetic_cache, tmp_path / "moved")
    assert verify_cache(tmp_path / "moved").shards == 5
