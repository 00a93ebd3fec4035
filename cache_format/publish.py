"""Committing a finished cache to its destination (a path or URL): shards and the teacher's tokenizer.json copied
and read back, then capture_config.json, then manifest.json, the commit point. Used by `kdcache merge` and by a
capture to a URL."""

import json
import logging
from pathlib import Path

from . import storage
from .errors import CacheError, KdcacheError
from .manifest import CONFIG_NAME, MANIFEST_NAME, TOKENIZER_NAME, Manifest, read_manifest, write_manifest

log = logging.getLogger("kdcache")


def commit_cache(parts: list[tuple[str, Manifest]], out: str, capture_config: dict, manifest: Manifest) -> None:
    """Copy every part's shards to `out` (each read back: CacheError if its sha256 differs), and the first part's
    tokenizer.json when `manifest` records one (checked the same way), then capture_config.json, then
    manifest.json."""
    dst_fs, dst = storage.resolve(out)
    for part, m in parts:
        src_fs, src = storage.resolve(part)
        for s in m.shards():
            source = storage.check_inside(src_fs, src, s.path, storage.join(part, s.path))
            storage.upload(src_fs, source, dst_fs, storage.join(dst, s.path), s.sha256,
                           f"{storage.join(part, s.path)} -> {storage.join(out, s.path)}")
    if manifest.tokenizer.file_sha256:
        part = parts[0][0]
        src_fs, src = storage.resolve(part)
        source = storage.check_inside(src_fs, src, TOKENIZER_NAME, storage.join(part, TOKENIZER_NAME))
        if storage.size(src_fs, source) is None:
            raise CacheError(f"{storage.join(part, TOKENIZER_NAME)}: missing (the manifest records its sha256)")
        storage.upload(src_fs, source, dst_fs, storage.join(dst, TOKENIZER_NAME),
                       manifest.tokenizer.file_sha256,
                       f"{storage.join(part, TOKENIZER_NAME)} -> {storage.join(out, TOKENIZER_NAME)}")
    storage.write_json(storage.join(out, CONFIG_NAME), capture_config)
    write_manifest(out, manifest)


def publish(src: str, out: str) -> str:
    """Copy a finished local cache to `out`, a path or URL (s3://...), with commit_cache's rule. Nothing to do if
    `out` already holds this cache; KdcacheError if it holds another one."""
    manifest = read_manifest(src)
    dst_fs, dst = storage.resolve(out)
    ours = (Path(src) / MANIFEST_NAME).read_bytes()
    if storage.size(dst_fs, storage.join(dst, MANIFEST_NAME)) is not None:
        if storage.read_bytes(dst_fs, storage.join(dst, MANIFEST_NAME)) != ours:
            raise KdcacheError(f"--out {out}: holds another cache (its {MANIFEST_NAME} differs); choose another --out")
        log.info("%s already holds this cache: nothing to upload", out)
        return out
    commit_cache([(src, manifest)], out, json.loads((Path(src) / CONFIG_NAME).read_text()), manifest)
    log.info("uploaded %s to %s: %d shards, each read back and checked", src, out, len(manifest.shards()))
    return out
