"""A manifest is input: every path it names stays inside its cache, for every reader and for merge, and a shard
that is a symbolic link out of the cache is refused. A failed merge leaves nothing behind."""

import json
import os
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from cache_format import CacheError, MANIFEST_NAME, open_cache, verify_cache
from pipeline.cli import cli
from pipeline.merge import MergeConfig, run_merge
from tests.helpers import write_synthetic_cache

HOSTILE = {
    "parent": "../../victim.txt",
    "sibling": "../PWNED/evil.parquet",
    "absolute": "/etc/passwd",
    "dotdot inside": "train/code/../../../x/shard-00000.parquet",
    "scheme": "s3://bucket/train/code/shard-00000.parquet",
    "other domain": "train/prose/shard-00000.parquet",
    "backslashes": "train\\code\\shard-00000.parquet",
    "not a shard name": "train/code/evil.txt",
}


@pytest.fixture
def part(tmp_path) -> Path:
    """A finished synthetic cache that is also a one-worker part (its capture_config names the shard plan)."""
    cache = tmp_path / "part"
    m = write_synthetic_cache(cache, {"code": 7})
    doc = json.loads((cache / MANIFEST_NAME).read_text())
    doc["capture_config"] = {"num_workers": 1, "worker_index": 0,
                             "plan": {f"{s}/{d}": len(info.shards) for s, ds in m.splits.items()
                                      for d, info in ds.items()}}
    (cache / MANIFEST_NAME).write_text(json.dumps(doc))
    return cache


def edit(cache: Path, change) -> None:
    doc = json.loads((cache / MANIFEST_NAME).read_text())
    change(doc)
    (cache / MANIFEST_NAME).write_text(json.dumps(doc))


def set_path(path):
    def change(doc):
        doc["splits"]["train"]["code"]["shards"][0]["path"] = path
    return change


def one_line(result, *parts) -> str:
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    for p in parts:
        assert p in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("path", HOSTILE.values(), ids=HOSTILE.keys())
def test_a_shard_path_outside_its_place_is_refused_by_every_reader(part, tmp_path, path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    edit(part, set_path(path))
    field = "splits.train.code.shards[0].path"
    with pytest.raises(CacheError, match=f"{field.replace('[', '.').replace(']', '.')}.*is not train/code/shard-"):
        open_cache(part)
    with pytest.raises(CacheError, match="a shard must lie inside its cache"):
        verify_cache(part)
    for args in (["verify", str(part)], ["inspect", str(part)], ["merge", str(part), "--out", str(tmp_path / "m")],
                 ["train", "--cache", str(part), "--student", str(tmp_path), "--out", str(tmp_path / "run"),
                  "--dry-run"],
                 ["eval", "--cache", str(part), "--student", str(tmp_path)],
                 ["profile", "--cache", str(part), "--student", str(tmp_path), "--out", str(tmp_path / "p.json")]):
        one_line(CliRunner().invoke(cli, args), field)
    assert victim.read_text() == "precious"
    assert not (tmp_path / "m").exists() and not (tmp_path / "PWNED").exists() and not (tmp_path / "run").exists()


@pytest.mark.parametrize("domain", ["..", ".", "a/b", "../x"])
def test_a_domain_name_that_is_not_a_plain_name_is_refused(part, domain):
    def change(doc):
        doc["splits"]["train"][domain] = doc["splits"]["train"].pop("code")
    edit(part, change)
    with pytest.raises(CacheError, match=f"domain name {domain!r} is not a plain name"):
        open_cache(part)


def test_a_shard_that_links_out_of_the_cache_is_refused(part, tmp_path):
    """The same bytes, so sha256 and size agree: only the link's target is wrong."""
    shard = part / "train" / "code" / "shard-00000.parquet"
    outside = tmp_path / "outside.parquet"
    shutil.move(shard, outside)
    os.symlink(outside, shard)
    cache = open_cache(part)
    with pytest.raises(CacheError, match="leads out of the cache .* through a symbolic link"):
        list(cache.iter_rows("train"))
    with pytest.raises(CacheError, match="through a symbolic link"):
        verify_cache(part)
    one_line(CliRunner().invoke(cli, ["merge", str(part), "--out", str(tmp_path / "m")]), "through a symbolic link")
    assert not (tmp_path / "m").exists()


def test_a_link_inside_the_cache_is_fine(part):
    shard = part / "train" / "code" / "shard-00000.parquet"
    shutil.move(shard, part / "elsewhere.parquet")
    os.symlink(part / "elsewhere.parquet", shard)
    verify_cache(part)


def test_a_failed_merge_leaves_nothing_and_a_retry_works(part, tmp_path):
    shard = part / "train" / "code" / "shard-00001.parquet"
    good = shard.read_bytes()
    shard.write_bytes(good[:100] + bytes([good[100] ^ 1]) + good[101:])          # same size, other sha256
    out = tmp_path / "merged"
    with pytest.raises(CacheError, match="sha256"):
        run_merge(MergeConfig((str(part),), str(out)))
    assert not out.exists() and not list(tmp_path.glob("merged*"))
    shard.write_bytes(good)
    run_merge(MergeConfig((str(part),), str(out)))
    verify_cache(out)
