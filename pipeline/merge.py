"""kdcache merge: the parts written by `capture --num-workers N --worker-index I` -> one cache, equal to a
single-worker capture (same shards, same bytes, same manifest). Parts and output are paths or URLs (s3://...):
every shard is copied and read back before the manifest is written."""

import json
import logging
from pathlib import Path

from cache_format import MANIFEST_NAME, DomainInfo, KdcacheError, read_manifest, storage, write_manifest
from cache_format.manifest import Manifest

from .capture import CONFIG_NAME

log = logging.getLogger("kdcache")


def run_merge(parts: list[str], out: str) -> str:
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

    dst_fs, dst = storage.resolve(out)
    if not storage.is_empty_dir(dst_fs, dst):
        raise KdcacheError(f"--out {out}: exists and is not an empty directory")
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
    engines = [m.teacher for m in manifests if m.shards()]
    identity = {k: v for k, v in base.items() if k != "plan"}
    merged = Manifest(teacher=(engines or [manifests[0].teacher])[0], tokenizer=manifests[0].tokenizer,
                      top_k=manifests[0].top_k, seq_len=manifests[0].seq_len, codec=manifests[0].codec,
                      split=manifests[0].split, splits=splits, capture_config=base,
                      created_by=manifests[0].created_by)
    _commit(list(zip(parts, manifests)), out, json.dumps(identity, indent=2, sort_keys=True).encode(), merged)
    log.info("merged %d parts into %s: %d shards", len(parts), out, len(merged.shards()))
    return out


def publish(src: str, out: str) -> str:
    """Copy a finished local cache (capture's staging directory) to `out`, a path or URL (s3://...), with the same
    commit rule: shards read back and checked, manifest last. Nothing to do if `out` already holds this cache."""
    manifest = read_manifest(src)
    dst_fs, dst = storage.resolve(out)
    ours = (Path(src) / MANIFEST_NAME).read_bytes()
    if storage.size(dst_fs, storage.join(dst, MANIFEST_NAME)) is not None:
        if storage.read_bytes(dst_fs, storage.join(dst, MANIFEST_NAME)) != ours:
            raise KdcacheError(f"--out {out}: holds another cache (its {MANIFEST_NAME} differs); choose another --out")
        log.info("%s already holds this cache: nothing to upload", out)
        return out
    _commit([(src, manifest)], out, (Path(src) / CONFIG_NAME).read_bytes(), manifest)
    log.info("uploaded %s to %s: %d shards, each read back and checked", src, out, len(manifest.shards()))
    return out


def _commit(parts: list[tuple[str, Manifest]], out: str, capture_config: bytes, manifest: Manifest) -> None:
    """Copy every part's shards to `out` (each read back: CacheError if its sha256 differs), then
    capture_config.json, then manifest.json: the commit point."""
    dst_fs, dst = storage.resolve(out)
    for part, m in parts:
        src_fs, src = storage.resolve(part)
        for s in m.shards():
            storage.upload(src_fs, storage.join(src, s.path), dst_fs, storage.join(dst, s.path), s.sha256,
                           f"{storage.join(part, s.path)} -> {storage.join(out, s.path)}")
    storage.write_bytes(dst_fs, storage.join(dst, CONFIG_NAME), capture_config)
    write_manifest(out, manifest)


def _identity(m: Manifest) -> dict:
    """The capture's options as a single worker would have recorded them."""
    return {**m.capture_config, "num_workers": 1, "worker_index": 0}


def _shards(m: Manifest, split: str, domain: str):
    info = m.splits.get(split, {}).get(domain)
    return info.shards if info else []
