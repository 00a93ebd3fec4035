"""kdcache merge: the parts written by `capture --num-workers N --worker-index I` -> one cache, equal to a
single-worker capture (same shards, same bytes, same manifest)."""

import logging
import os
import shutil
from pathlib import Path

from cache_format import CacheError, DomainInfo, KdcacheError, file_sha256, read_manifest, write_manifest
from cache_format.manifest import Manifest

from .capture import CONFIG_NAME, _atomic_write_json

log = logging.getLogger("kdcache")


def run_merge(parts: list[str], out: str) -> Path:
    manifests = [read_manifest(p) for p in parts]                # refuses unfinished parts
    n = manifests[0].capture_config.get("num_workers")
    indices = sorted(m.capture_config.get("worker_index") for m in manifests)
    if indices != list(range(len(parts))) or any(m.capture_config.get("num_workers") != n for m in manifests) \
            or n != len(parts):
        raise KdcacheError(f"merge needs the {n} parts of one capture, worker indices 0..{n - 1} once each; "
                           f"got worker indices {indices}")
    base = _identity(manifests[0])
    for part, m in zip(parts[1:], manifests[1:]):
        other = _identity(m)
        diff = sorted(k for k in set(base) | set(other) if base.get(k) != other.get(k))
        if diff:
            raise KdcacheError(f"{part}: not a part of the same capture as {parts[0]} (differs in: {', '.join(diff)})")

    dest = Path(out)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise KdcacheError(f"--out {dest}: exists and is not an empty directory")
    dest.mkdir(parents=True, exist_ok=True)
    plan = base["plan"]
    splits: dict[str, dict[str, DomainInfo]] = {}
    for split in ("train", "val"):
        splits[split] = {}
        for domain in sorted({d for m in manifests for d in m.splits.get(split, {})}):
            shards = sorted((s for m in manifests for s in _shards(m, split, domain)),
                            key=lambda s: s.path)
            if len(shards) != plan.get(f"{split}/{domain}", 0):
                raise KdcacheError(f"{split}/{domain}: {len(shards)} shards across the parts, the capture planned "
                                   f"{plan.get(f'{split}/{domain}', 0)}")
            splits[split][domain] = DomainInfo(rows=sum(s.rows for s in shards),
                                               tokens=sum(s.tokens for s in shards), shards=shards)
    for m, part in zip(manifests, parts):
        for s in m.shards():
            _copy_verified(Path(part) / s.path, dest / s.path, s.sha256)

    engines = [m.teacher for m in manifests if m.shards()]
    identity = {k: v for k, v in base.items() if k != "plan"}
    _atomic_write_json(dest / CONFIG_NAME, identity)
    merged = Manifest(teacher=(engines or [manifests[0].teacher])[0], tokenizer=manifests[0].tokenizer,
                      top_k=manifests[0].top_k, seq_len=manifests[0].seq_len, codec=manifests[0].codec,
                      split=manifests[0].split, splits=splits, capture_config=base,
                      created_by=manifests[0].created_by)
    write_manifest(dest, merged)
    log.info("merged %d parts into %s: %d shards", len(parts), dest, len(merged.shards()))
    return dest


def _identity(m: Manifest) -> dict:
    """The capture's options as a single worker would have recorded them."""
    return {**m.capture_config, "num_workers": 1, "worker_index": 0}


def _shards(m: Manifest, split: str, domain: str):
    info = m.splits.get(split, {}).get(domain)
    return info.shards if info else []


def _copy_verified(src: Path, dst: Path, sha256: str) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.copyfile(src, tmp)
    if file_sha256(tmp) != sha256:
        tmp.unlink()
        raise CacheError(f"{src}: sha256 mismatch (shard corrupted); not merged")
    os.replace(tmp, dst)
