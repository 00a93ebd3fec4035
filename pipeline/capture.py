"""kdcache capture: corpus -> teacher top-k -> sharded cache. Resumable, and splittable over workers.

The unit of work is a shard: rows [j*R, (j+1)*R) of one (split, domain) stream, R = rows_per_shard derived from the
target shard size. Rows are a deterministic function of the corpus and the options, so every worker packs the
same streams and runs the teacher only on its own shards; a shard's rows go through the engine in batches that
start at the shard's first row, so a shard's bytes do not depend on the number of workers or on restarts.

Resume: a finished shard is renamed into place and recorded in `.progress/`; a re-run keeps those and redoes the
rest. The manifest is written last.
"""

import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
from tqdm import tqdm

from cache_format import (DomainInfo, KdcacheError, Manifest, ShardInfo, ShardWriter, SplitRule, TeacherInfo,
                          TokenizerInfo, TopkV1, files_fingerprint, tokenizer_fingerprint, weights_fingerprint,
                          write_manifest)
from cache_format.manifest import MANIFEST_NAME

from . import __version__
from .corpus import DataSpec, iter_split_rows, resolve_files

log = logging.getLogger("kdcache")
CONFIG_NAME = "capture_config.json"
PROGRESS_DIR = ".progress"
SPLIT_RULE = "val if int(sha256(f'{seed}:{text}')[:16], 16) / 2**64 < val_fraction else train"
# options that change no byte of the cache: a re-run may change them freely
RUNTIME_OPTIONS = ("out", "gpu_memory_utilization", "tensor_parallel_size")


@dataclass(frozen=True)
class CaptureConfig:
    teacher: str
    data: tuple[DataSpec, ...]
    out: str
    backend: str | None = None          # None: vllm when it can run, else hf
    top_k: int = 64
    seq_len: int = 1024
    val_fraction: float = 0.02
    split_seed: int = 0
    max_tokens_per_domain: int | None = None
    batch_size: int = 32                # rows per engine call
    dtype: str = "auto"
    text_field: str = "text"
    num_workers: int = 1
    worker_index: int = 0
    shard_size_mb: float = 256.0        # target shard size (sets rows per shard)
    gpu_memory_utilization: float | None = None
    tensor_parallel_size: int = 1

    def __post_init__(self):
        checks = [
            (self.top_k > 0, f"--top-k must be > 0, got {self.top_k}"),
            (self.seq_len >= 2, f"--seq-len must be >= 2, got {self.seq_len}"),
            (0.0 <= self.val_fraction < 1.0, f"--val-fraction must be in [0, 1), got {self.val_fraction}"),
            (self.batch_size > 0, f"--batch-size must be > 0, got {self.batch_size}"),
            (self.num_workers >= 1, f"--num-workers must be >= 1, got {self.num_workers}"),
            (0 <= self.worker_index < self.num_workers,
             f"--worker-index must be in [0, {self.num_workers}), got {self.worker_index}"),
            (self.max_tokens_per_domain is None or self.max_tokens_per_domain > 0,
             f"--max-tokens-per-domain must be > 0, got {self.max_tokens_per_domain}"),
            (self.shard_size_mb > 0, f"--shard-size-mb must be > 0, got {self.shard_size_mb}"),
            (len(self.data) > 0, "no --data given (use --data DOMAIN=PATH, repeatable)"),
            (len({d.domain for d in self.data}) == len(self.data), "a domain is given twice in --data"),
        ]
        for ok, msg in checks:
            if not ok:
                raise KdcacheError(msg)

    @property
    def rows_per_shard(self) -> int:
        bytes_per_row = self.seq_len * (8 * self.top_k + 8)    # topk-v1 before compression
        return max(1, int(self.shard_size_mb * 2**20) // bytes_per_row)

    @property
    def row_group_rows(self) -> int:
        return max(1, min(self.rows_per_shard, 65536 // self.seq_len))


def run_capture(cfg: CaptureConfig) -> Path:
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise KdcacheError(f"--out {out}: exists and is not a directory")
    from .teachers import load_teacher, model_name, read_model_config, resolve_backend
    model_config = read_model_config(cfg.teacher)
    files = {spec.domain: resolve_files(spec) for spec in cfg.data}         # bad data paths fail before any work
    tokenizer = _load_tokenizer(cfg.teacher)
    vocab = int(model_config["vocab_size"])
    if cfg.top_k > vocab:
        raise KdcacheError(f"--top-k {cfg.top_k} is above the teacher's vocabulary size {vocab}")
    max_pos = model_config.get("max_position_embeddings")
    if max_pos and cfg.seq_len > max_pos:
        raise KdcacheError(f"--seq-len {cfg.seq_len} is above the teacher's max_position_embeddings {max_pos}")
    cfg = replace(cfg, backend=resolve_backend(cfg.backend))

    identity = {k: v for k, v in _jsonable(asdict(cfg)).items() if k not in RUNTIME_OPTIONS}
    identity["teacher_fingerprint"] = weights_fingerprint(cfg.teacher)
    identity["data_fingerprint"] = {d: files_fingerprint(f) for d, f in files.items()}
    out.mkdir(parents=True, exist_ok=True)
    _check_or_write_identity(out, identity)
    if (out / MANIFEST_NAME).exists():
        log.info("%s is already complete (same options): nothing to do", out)
        return out

    codec = TopkV1(top_k=cfg.top_k)
    R = cfg.rows_per_shard
    streams = [(split, spec.domain) for spec in cfg.data for split in ("train", "val")]
    offsets = {s: i for i, s in enumerate(sorted(streams))}
    mine = lambda split, domain, j: (j + offsets[(split, domain)]) % cfg.num_workers == cfg.worker_index  # noqa

    teacher = None
    shards: dict[tuple[str, str], list[ShardInfo]] = {s: [] for s in streams}
    plan: dict[str, int] = {}
    # tokens through the teacher; an ETA needs a known total, which --max-tokens-per-domain gives
    total = cfg.max_tokens_per_domain * len(cfg.data) // cfg.num_workers if cfg.max_tokens_per_domain else None
    bar = tqdm(unit="tok", unit_scale=True, desc="capture", dynamic_ncols=True, smoothing=0.1, total=total)
    teacher_tokens, load_seconds = 0, 0.0           # work done by this run; the engine start is timed apart
    started = time.perf_counter()
    try:
        for spec in cfg.data:
            pending: dict[str, list[np.ndarray]] = {"train": [], "val": []}
            counts = {"train": 0, "val": 0}

            def finish(split: str) -> None:
                nonlocal teacher, teacher_tokens, load_seconds
                rows = pending[split]
                j = counts[split] // R
                counts[split] += len(rows)
                pending[split] = []
                if not mine(split, spec.domain, j):
                    return
                rel = f"{split}/{spec.domain}/shard-{j:05d}.parquet"
                info = _finished_shard(out, rel)
                if info is None:
                    if teacher is None:
                        t0 = time.perf_counter()
                        teacher = load_teacher(cfg.teacher, cfg.backend, cfg.top_k, cfg.seq_len, cfg.dtype,
                                               **_engine_options(cfg))
                        _save_engine(out, {"name": teacher.engine, "version": teacher.engine_version,
                                           "dtype": teacher.dtype})
                        load_seconds = time.perf_counter() - t0
                        bar.reset(total=total)             # rates from here on, engine start excluded
                    info = _capture_shard(out, rel, rows, j * R, spec.domain, teacher, cfg, codec, bar)
                    teacher_tokens += info.tokens
                shards[(split, spec.domain)].append(info)

            for split, _, row in iter_split_rows(spec, tokenizer, cfg.seq_len, cfg.split_seed, cfg.val_fraction,
                                                 cfg.text_field, cfg.max_tokens_per_domain):
                pending[split].append(row)
                if len(pending[split]) == R:
                    finish(split)
            for split in ("train", "val"):
                if pending[split]:
                    finish(split)
                plan[f"{split}/{spec.domain}"] = -(-counts[split] // R)
    finally:
        bar.close()
        if teacher is not None:
            teacher.close()
    if teacher_tokens:
        seconds = time.perf_counter() - started - load_seconds
        log.info("captured %d tokens in %.1fs (%.0f tokens/s end to end, engine start of %.0fs excluded)",
                 teacher_tokens, seconds, teacher_tokens / seconds, load_seconds)

    splits = {split: {} for split in ("train", "val")}
    for (split, domain), infos in shards.items():
        splits[split][domain] = DomainInfo(rows=sum(s.rows for s in infos), tokens=sum(s.tokens for s in infos),
                                           shards=sorted(infos, key=lambda s: s.path))
    # the engine that ran this part's shards (recorded when it started, so a resumed run still knows it)
    engine = _saved_engine(out) or {"name": cfg.backend, "version": "", "dtype": cfg.dtype}
    manifest = Manifest(
        teacher=TeacherInfo(path=str(Path(cfg.teacher).resolve()), name=model_name(cfg.teacher),
                            fingerprint=identity["teacher_fingerprint"], engine=engine["name"],
                            engine_version=engine["version"], logprobs_mode="raw_logprobs", dtype=engine["dtype"]),
        tokenizer=TokenizerInfo(vocab_size=len(tokenizer), fingerprint=tokenizer_fingerprint(tokenizer),
                                eos_id=int(tokenizer.eos_token_id)),
        top_k=cfg.top_k, seq_len=cfg.seq_len, codec=codec.params(),
        split=SplitRule(rule=SPLIT_RULE, seed=cfg.split_seed, val_fraction=cfg.val_fraction),
        splits=splits, capture_config={**identity, "plan": plan}, created_by=f"kdcache {__version__}")
    write_manifest(out, manifest)
    shutil.rmtree(out / PROGRESS_DIR, ignore_errors=True)
    total = sum(d.tokens for ds in splits.values() for d in ds.values())
    log.info("wrote %s: %d shards, %d tokens", out, len(manifest.shards()), total)
    return out


def _capture_shard(out: Path, rel: str, rows: list[np.ndarray], first_row: int, domain: str, teacher,
                   cfg: CaptureConfig, codec: TopkV1, bar: tqdm) -> ShardInfo:
    """Run the teacher over one shard's rows (batches aligned to the shard start) and commit the shard."""
    writer = ShardWriter(out, rel, codec, row_group_rows=cfg.row_group_rows)
    try:
        for b in range(0, len(rows), cfg.batch_size):
            batch = rows[b:b + cfg.batch_size]
            for i, (row, (ids, lps, target)) in enumerate(zip(batch, teacher.topk(batch, cfg.top_k))):
                writer.write({"row_index": first_row + b + i, "domain": domain, "input_ids": row,
                              "topk_ids": ids, "topk_logprobs": lps, "target_logprobs": target})
            bar.update(sum(len(r) for r in batch))
        info = writer.close()
    except BaseException:
        writer.abort()
        raise
    record = out / PROGRESS_DIR / (rel + ".json")
    record.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write_json(record, asdict(info))
    return info


def _finished_shard(out: Path, rel: str) -> ShardInfo | None:
    """The ShardInfo of a shard a previous run committed, if its file is there and matches its record."""
    record = out / PROGRESS_DIR / (rel + ".json")
    if not record.exists() or not (out / rel).exists():
        return None
    info = ShardInfo(**json.loads(record.read_text()))
    if (out / rel).stat().st_size != info.bytes:
        return None
    return info


def _engine_options(cfg: CaptureConfig) -> dict:
    if cfg.backend != "vllm":
        return {}
    return {"gpu_memory_utilization": cfg.gpu_memory_utilization, "tensor_parallel_size": cfg.tensor_parallel_size}


def _check_or_write_identity(out: Path, identity: dict) -> None:
    path = out / CONFIG_NAME
    if path.exists():
        before = json.loads(path.read_text())
        diff = sorted(k for k in set(before) | set(identity) if before.get(k) != identity.get(k))
        if diff:
            details = "; ".join(f"{k}: {_short(before.get(k))} -> {_short(identity.get(k))}" for k in diff)
            raise KdcacheError(f"--out {out} holds a capture made with other settings ({details}); "
                               f"use another --out or the same options")
    else:
        if any(p.name != PROGRESS_DIR for p in out.iterdir()):
            raise KdcacheError(f"--out {out}: directory is not empty and holds no kdcache capture")
        _atomic_write_json(path, identity)


def _saved_engine(out: Path) -> dict | None:
    path = out / PROGRESS_DIR / "engine.json"
    return json.loads(path.read_text()) if path.exists() else None


def _save_engine(out: Path, engine: dict) -> None:
    (out / PROGRESS_DIR).mkdir(exist_ok=True)
    _atomic_write_json(out / PROGRESS_DIR / "engine.json", engine)


def _load_tokenizer(path: str):
    from transformers import AutoTokenizer
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise KdcacheError(f"--teacher {path}: cannot load its tokenizer ({e})") from None
    if tokenizer.eos_token_id is None:
        raise KdcacheError(f"--teacher {path}: tokenizer has no eos token (needed to join documents)")
    return tokenizer


def _atomic_write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True))
    os.replace(tmp, path)


def _jsonable(d: dict) -> dict:
    return json.loads(json.dumps(d, default=lambda o: asdict(o) if hasattr(o, "__dataclass_fields__") else str(o)))


def _short(v) -> str:
    s = json.dumps(v)
    return s if len(s) <= 60 else s[:57] + "..."
