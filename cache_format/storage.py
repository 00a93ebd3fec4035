"""Where a cache lives: a local path, or a URL of any pyarrow or fsspec filesystem (file://, s3://, gs://, ...).

`resolve(location)` gives (pyarrow filesystem, path inside it). S3 is configured the usual way: credentials from the
AWS chain (environment, AWS_PROFILE, instance role), the endpoint from AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL
(pyarrow does not read them by itself, so they are passed on as endpoint_override), the region from AWS_REGION /
AWS_DEFAULT_REGION. AWS_REQUEST_CHECKSUM_CALCULATION defaults to WHEN_REQUIRED: with the SDK's newer default
(WHEN_SUPPORTED) some S3-compatible stores (SeaweedFS 4.48, measured) keep the client's chunk-signing frames inside
the stored object. Whatever the setting, `upload` reads every object back and checks its sha256, so such an upload
is refused, never committed.

Commit rule, as on a local disk: shards first (each verified), manifest.json last. Locally a file is written to a
tmp name, fsynced and renamed; an object store has no rename but makes an object visible only once its upload
completed, so an object is written under its final key directly.
"""

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import socket
import time
from pathlib import Path
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.fs as pafs

from .errors import CacheError, KdcacheError

log = logging.getLogger("kdcache")

CHECKSUM_ENV = "AWS_REQUEST_CHECKSUM_CALCULATION"
CHUNK = 1 << 22


def resolve(location: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path) for a local path or a URL; CacheError for a URL no filesystem serves."""
    location = str(location)
    if "://" not in location:
        return pafs.LocalFileSystem(), os.path.abspath(location)
    if location.startswith("s3://"):
        return _s3(location)
    try:
        return pafs.FileSystem.from_uri(location)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        pass
    try:
        import fsspec
        fs, path = fsspec.core.url_to_fs(location)
    except (ImportError, ValueError) as e:
        raise CacheError(f"{location}: no filesystem for this URL ({e})") from None
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


def _s3(url: str) -> tuple[pafs.FileSystem, str]:
    os.environ.setdefault(CHECKSUM_ENV, "WHEN_REQUIRED")       # read by the AWS SDK when the client is made
    options = {}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        parsed = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
        options.update(endpoint_override=parsed.netloc, scheme=parsed.scheme)
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        options["region"] = region
    parsed = urlparse(url)
    return pafs.S3FileSystem(**options), f"{parsed.netloc}{parsed.path}".rstrip("/")


def join(path: str, rel: str) -> str:
    return f"{path.rstrip('/')}/{rel}"


@contextlib.contextmanager
def exclusive(path: str | os.PathLike, what: str):
    """Hold an exclusive advisory lock (flock) on PATH.lock, beside a local output PATH, while a `what` ("kdcache
    capture") writes it: a second writer is refused with KdcacheError naming the holder (what, pid, host, since).
    The file is removed on release. A lock dies with its process; one whose holder died (its file left behind) is
    taken over with a warning."""
    lock = Path(str(path).rstrip("/") + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    while True:
        f = open(lock, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "holder unknown"
            f.close()
            raise KdcacheError(f"{path}: another run is writing it ({holder}); wait for it to finish or choose "
                               "another output") from None
        if lock.exists() and os.stat(lock).st_ino == os.fstat(f.fileno()).st_ino:
            break                                         # else its holder removed it as we opened it: again
        f.close()
    with f:
        f.seek(0)
        if previous := f.read().strip():
            log.warning("%s: taking over the lock of a run that ended without releasing it (%s)", path, previous)
        f.seek(0)
        f.truncate()
        f.write(f"{what}, pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        f.flush()
        try:
            yield
        finally:
            lock.unlink(missing_ok=True)                  # while still held: the next writer opens a new file


def check_inside(fs: pafs.FileSystem, base: str, rel: str, where: str) -> str:
    """join(base, rel), after checking that on a local filesystem no symlink takes it out of `base`: CacheError
    naming `where` otherwise. (Object stores have no links; manifest paths are checked by Manifest.from_dict.)"""
    path = join(base, rel)
    if isinstance(fs, pafs.LocalFileSystem):
        real, root = os.path.realpath(path), os.path.realpath(base)
        if os.path.commonpath([real, root]) != root:
            raise CacheError(f"{where}: leads out of the cache (to {real}) through a symbolic link; refused")
    return path


def size(fs: pafs.FileSystem, path: str) -> int | None:
    """The file's size in bytes, None if there is no such file."""
    info = fs.get_file_info(path)
    return info.size if info.type == pafs.FileType.File else None


def is_empty_dir(fs: pafs.FileSystem, path: str) -> bool:
    """True if nothing exists under `path` (a prefix on an object store)."""
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        return True
    return info.type == pafs.FileType.Directory and not fs.get_file_info(pafs.FileSelector(path, recursive=False))


def sha256(fs: pafs.FileSystem, path: str) -> str:
    h = hashlib.sha256()
    with fs.open_input_stream(path) as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()


def read_bytes(fs: pafs.FileSystem, path: str) -> bytes:
    with fs.open_input_stream(path) as f:
        return f.read()


def out_of_space(path, error: BaseException) -> KdcacheError | None:
    """The one-line error for a write to `path` that failed because its device is full (ENOSPC, EDQUOT, pyarrow's
    and torch's messages for them); None for any other error."""
    full = isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT) or \
        isinstance(error, (OSError, RuntimeError)) and any(m in str(error) for m in (
            "No space left on device", "Disk quota exceeded", "unexpected pos", "file write failed"))
    return KdcacheError(f"{path}: no space left on the device while writing it; nothing half-written is kept (free "
                        "space and run the same command again: a capture resumes, a train run with --resume)") \
        if full else None


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yields `path` + ".tmp" to write a file or a directory into; when the block ends without error it replaces
    `path` in one rename (an old directory there is removed first), else it is removed. A crash leaves at most the
    tmp, which the next write replaces."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    _remove(tmp)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        yield tmp
    except BaseException as e:
        _remove(tmp)
        if (full := out_of_space(path, e)) is not None and not isinstance(e, KdcacheError):
            raise full from None
        raise
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    os.replace(tmp, path)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def write_bytes(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    """Write a whole file atomically (local: atomic_path + fsync; object store: one upload)."""
    if isinstance(fs, pafs.LocalFileSystem):
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return
    with fs.open_output_stream(path) as f:
        f.write(data)


def write_json(location: str | os.PathLike, obj) -> None:
    """obj as indented JSON with sorted keys, written atomically to a local path or a URL."""
    fs, path = resolve(location)
    write_bytes(fs, path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def upload(src_fs: pafs.FileSystem, src: str, dst_fs: pafs.FileSystem, dst: str, digest: str, where: str) -> None:
    """Copy one file and read the copy back: CacheError naming `where` (and nothing left under dst) unless its
    sha256 is `digest`. Local: through a tmp file renamed once verified."""
    local = isinstance(dst_fs, pafs.LocalFileSystem)
    target = dst + ".tmp" if local else dst
    if local:
        os.makedirs(os.path.dirname(dst), exist_ok=True)
    with src_fs.open_input_stream(src) as fin, dst_fs.open_output_stream(target) as fout:
        while block := fin.read(CHUNK):
            fout.write(block)
    got = sha256(dst_fs, target)
    if got != digest:
        dst_fs.delete_file(target)
        raise CacheError(f"{where}: the copy's sha256 is {got[:12]}..., the manifest's {digest[:12]}... (a corrupt "
                         f"source, or bytes altered on the way: on S3-compatible stores set "
                         f"{CHECKSUM_ENV}=WHEN_REQUIRED); not committed")
    if local:
        os.replace(target, dst)
