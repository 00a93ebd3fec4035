"""kdcache merge: the parts of N capture workers -> the cache one worker writes, byte for byte; bad parts refused."""

from pathlib import Path

import pytest

from cache_format import CONFIG_NAME, TOKENIZER_NAME, KdcacheError, verify_cache
from pipeline.capture import run_capture
from pipeline.config import CaptureConfig
from pipeline.merge import MergeConfig, run_merge
from tests.helpers import kdcache


def capture(tiny_models, specs, out: Path, **options) -> Path:
    options = {"backend": "hf", "top_k": 8, "seq_len": 32, "val_fraction": 0.2, "shard_size_mb": 0.01, **options}
    return Path(run_capture(CaptureConfig(teacher=str(tiny_models["teacher"]), data=tuple(specs), out=str(out),
                                          **options)))


def files(cache: Path) -> dict[str, bytes]:
    return {str(p.relative_to(cache)): p.read_bytes() for p in sorted(cache.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def captures(tiny_models, tmp_path_factory):
    """A one-worker capture of the toy corpus and the same capture split over 3 workers."""
    from tests.toy import write_toy_corpus
    root = tmp_path_factory.mktemp("merge")
    specs = write_toy_corpus(root / "corpus", 40, seed=4)
    single = capture(tiny_models, specs, root / "single")
    parts = [capture(tiny_models, specs, root / f"part{i}", num_workers=3, worker_index=i) for i in range(3)]
    return specs, single, parts


def test_merged_parts_equal_the_single_worker_cache(captures, tmp_path):
    _, single, parts = captures
    assert all(len(files(p)) > 2 for p in parts)                          # every worker wrote shards
    out = run_merge(MergeConfig(tuple(map(str, reversed(parts))), str(tmp_path / "merged")))   # any order
    verify_cache(out)
    assert files(Path(out)) == files(single)              # shards, manifest, capture_config.json, tokenizer.json
    assert CONFIG_NAME in files(single) and TOKENIZER_NAME in files(single)


def test_the_cli_merges_and_refuses_in_one_line(captures, tmp_path):
    _, single, parts = captures
    r = kdcache("merge", *parts, "--out", tmp_path / "m")
    assert r.returncode == 0, r.stderr
    assert files(tmp_path / "m") == files(single)
    r = kdcache("merge", parts[0], parts[1], "--out", tmp_path / "m2")
    assert r.returncode == 1 and r.stderr.strip().splitlines()[-1].startswith("Error: merge needs the 3 parts")
    assert not (tmp_path / "m2").exists()


def test_bad_parts_are_refused(captures, tiny_models, tmp_path):
    specs, single, parts = captures
    with pytest.raises(KdcacheError, match=r"worker indices 0..2 once each; got worker indices \[0, 0, 1\]"):
        run_merge(MergeConfig((str(parts[0]), str(parts[0]), str(parts[1])), str(tmp_path / "a")))
    other = capture(tiny_models, specs, tmp_path / "other", num_workers=3, worker_index=2, top_k=4)
    with pytest.raises(KdcacheError, match=rf"{other}: not a part of the same capture .*top_k"):
        run_merge(MergeConfig((str(parts[0]), str(parts[1]), str(other)), str(tmp_path / "b")))
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("keep me")
    with pytest.raises(KdcacheError, match="exists and is not an empty directory"):
        run_merge(MergeConfig(tuple(map(str, parts)), str(tmp_path / "busy")))
    assert (tmp_path / "busy" / "x").read_text() == "keep me"
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    with pytest.raises(KdcacheError, match="no manifest.json"):
        run_merge(MergeConfig((str(parts[0]), str(parts[1]), str(unfinished)), str(tmp_path / "c")))
