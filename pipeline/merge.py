"""kdcache merge: the parts written by `capture --num-workers N --worker-index I` -> one cache, equal to a
single-worker capture (same shards, same bytes, same manifest). Parts and output are paths or URLs (s3://...):
every shard is copied and read back before the manifest is written."""

import logging
from dataclasses import dataclass

from cache_format import DomainInfo, KdcacheError, Manifest, commit_cache, read_manifest, storage

from .capture import identity_diff

log = logging.getLogger("kdcache")


@dataclass(frozen=True)
class MergeConfig:
    parts: tuple[str, ...]      # the worker outputs (paths or URLs), in any order
    out: str                    # a new or empty directory (or URL)


def run_merge(cfg: MergeConfig) -> str:
    """Check that cfg.parts are every worker of one capture, then commit the merged cache to cfg.out; returns it.
    The resolved config is the capture's (capture_config.json beside the manifest)."""
    parts, out = list(cfg.parts), cfg.out
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
        diff = identity_diff(base, other)
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
                      created_by=manifests[0].created_by, packing=manifests[0].packing)
    if "://" in out:                                      # an object store: the manifest, written last, commits
        commit_cache(list(zip(parts, manifests)), out, identity, merged)
    else:                                                 # built beside --out, renamed into place when complete
        with storage.exclusive(out, "kdcache merge"), storage.atomic_path(out) as building:
            commit_cache(list(zip(parts, manifests)), str(building), identity, merged)
    log.info("merged %d parts into %s: %d shards", len(parts), out, len(merged.shards()))
    return out


def _identity(m: Manifest) -> dict:
    """The capture's options as a single worker would have recorded them."""
    return {**m.capture_config, "num_workers": 1, "worker_index": 0}


def _shards(m: Manifest, split: str, domain: str):
    info = m.splits.get(split, {}).get(domain)
    return info.shards if info else []
