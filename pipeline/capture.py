"""kdcache capture: corpus -> teacher top-k -> sharded cache. Resumable, and splittable over workers.

The unit of work is a shard: rows [j*R, (j+1)*R) of one (split, domain) stream, R = rows_per_shard derived from the
target shard size. Rows are a deterministic function of the corpus and the options, so every worker packs the
same streams and runs the teacher only on its own shards; a shard's rows go through the engine in batches that
start at the shard's first row, so a shard's bytes do not depend on the number of workers or on restarts.

Resume: a finished shard is renamed into place and recorded in `.progress/`; a re-run keeps those and redoes the
rest. The manifest is written last.
"""

import hashlib
import json
import logging
import os
import queue
import shutil
import threading
import time
import zlib
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from cache_format import (CONFIG_NAME, MANIFEST_NAME, DomainInfo, KdcacheError, Manifest, ShardInfo, ShardWriter,
                          SplitRule, TeacherInfo, TokenizerInfo, TopkV1, TopkV2, TopkV3, files_fingerprint, publish,
                          storage, tokenizer_fingerprint, weights_fingerprint, write_manifest, write_tokenizer)
from trainer.tokenizer import load_tokenizer

from . import __version__
from .chat import load_template, resolve_template, template_fingerprint
from .config import LOCATIONS, RUNTIME_OPTIONS, CaptureConfig
from .corpus import CorpusStats, Reading, Row, holds_conversations, iter_split_rows, resolve_files

log = logging.getLogger("kdcache")
PROGRESS_DIR = ".progress"
SPLIT_RULE = "val if int(sha256(f'{seed}:{text}')[:16], 16) / 2**64 < val_fraction else train"
WRITE_AHEAD = 2             # engine batches that may wait for the writer thread
PROBE_ROWS, PROBE_TOKENS = 4, 128     # the rows on which vLLM's hidden-states output is checked (VLLMTeacher)


@dataclass(frozen=True)
class TeacherSource:
    """Who the teacher is (the manifest's path, name and fingerprint; the vocabulary its ids come from) and, for a
    teacher behind servers, the checked fleet that runs it."""
    path: str
    name: str
    fingerprint: str
    vocab_size: int
    fleet: object | None = None          # a ServedTeacher

    def close(self) -> None:
        if self.fleet is not None:
            self.fleet.close()


def run_capture(cfg: CaptureConfig, stats: dict | None = None) -> Path | str:
    """Capture (or resume) the cache cfg.out; returns its path. `stats`, when given, receives this run's
    {"tokens", "seconds", "engine_start_s"}: the tokens sent through the teacher, their wall time end to end
    (tokenisation, engine, writing) and the engine start, timed apart. An --out URL (s3://...) is captured into a
    local staging directory (resumable there), then uploaded shard by shard, each read back, manifest last."""
    if "://" in cfg.out:
        return publish(str(run_capture(replace(cfg, out=str(staging_dir(cfg.out))), stats)), cfg.out)
    with storage.exclusive(cfg.out, "kdcache capture"):                # one writer per --out
        cfg, tokenizer, source, reading = _resolve(cfg)
        try:
            with logging_redirect_tqdm():         # log lines (a server dropped...) above the progress bar, not in it
                return _capture(cfg, tokenizer, source, reading, stats)
        finally:
            source.close()


def _capture(cfg: CaptureConfig, tokenizer, source: TeacherSource, reading: Reading, stats: dict | None) -> Path:
    out, identity = Path(cfg.out), _identity(cfg, tokenizer, reading, source)
    if _check_identity(out, identity):
        log.info("%s is already complete (same options): nothing to do", out)
        return out
    fresh = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    storage.write_json(out / CONFIG_NAME, identity)
    write_tokenizer(out, tokenizer)                        # the teacher's tokenizer.json, beside the manifest
    codec = cfg.make_codec(max(source.vocab_size, len(tokenizer)))     # ids the teacher can return
    R, mine = cfg.rows_per_shard, _owner(cfg)
    shards: dict[tuple[str, str], list[ShardInfo]] = {s: [] for s in _streams(cfg)}
    plan = {f"{split}/{domain}": 0 for split, domain in _streams(cfg)}     # shards per stream, all workers
    # tokens through the teacher; an ETA needs a known total, which --max-tokens-per-domain gives
    total = cfg.max_tokens_per_domain * len(cfg.data) // cfg.num_workers if cfg.max_tokens_per_domain else None
    bar = tqdm(unit="tok", unit_scale=True, desc="capture", dynamic_ncols=True, smoothing=0.1, total=total)
    teacher, teacher_tokens, engine_seconds = None, 0, 0.0   # the engine starts on the first shard left to do
    started = time.perf_counter()
    corpus = {spec.domain: CorpusStats() for spec in cfg.data}
    try:
        for split, domain, j, rows in _shard_rows(cfg, tokenizer, reading, corpus):
            plan[f"{split}/{domain}"] = j + 1
            if not mine(split, domain, j):
                continue
            rel = f"{split}/{domain}/shard-{j:05d}.parquet"
            info = _finished_shard(out, rel)
            if info is None:
                if teacher is None:
                    teacher, engine_seconds = _start_engine(cfg, out, rows, source)
                    bar.reset(total=total)                     # rates from here on, engine start excluded
                info = _capture_shard(out, rel, rows, j * R, domain, teacher, cfg, codec, bar)
                teacher_tokens += info.tokens
            shards[(split, domain)].append(info)
    except BaseException:
        if fresh and not any(shards.values()):             # failed before its first shard: leave nothing behind
            shutil.rmtree(out, ignore_errors=True)
        raise
    finally:
        bar.close()
        if teacher is not None:
            teacher.close()
    if teacher_tokens:
        seconds = time.perf_counter() - started - engine_seconds
        log.info("captured %d tokens in %.1fs (%.0f tokens/s end to end, engine start of %.0fs excluded)",
                 teacher_tokens, seconds, teacher_tokens / seconds, engine_seconds)
        if stats is not None:
            stats.update(tokens=teacher_tokens, seconds=seconds, engine_start_s=engine_seconds)
    _log_skipped(corpus)
    manifest = _manifest(cfg, out, tokenizer, codec, identity, shards, plan, source)
    write_manifest(out, manifest)
    shutil.rmtree(out / PROGRESS_DIR, ignore_errors=True)
    domains = [d for ds in manifest.splits.values() for d in ds.values()]
    log.info("wrote %s: %d shards, %d tokens (%d supervised)", out, len(manifest.shards()),
             sum(d.tokens for d in domains), sum(d.supervised_tokens for d in domains))
    return out


def _log_skipped(corpus: dict[str, CorpusStats]) -> None:
    for domain, stats in corpus.items():
        if stats.no_response or stats.truncated:
            log.warning("domain %s: %d conversations without an assistant turn to train on skipped, %d truncated "
                        "at --seq-len", domain, stats.no_response, stats.truncated)


def plan_capture(cfg: CaptureConfig) -> dict:
    """--dry-run: check every input as run_capture does and tokenize the corpus, but start no engine and write
    nothing; the plan: per domain the rows, tokens and shards of each split, the shards this worker would run, the
    cache's size bound and what the engine needs."""
    cfg, tokenizer, source, reading = _resolve(cfg)
    source.close()                                  # a served teacher was checked; no request goes further
    out = Path(cfg.out) if "://" not in cfg.out else None
    state = "new"
    if out is not None and _check_identity(out, _identity(cfg, tokenizer, reading, source)):
        state = "complete (nothing to do)"
    elif out is not None and (out / CONFIG_NAME).exists():
        state = "a capture with the same options: resumes"
    R, owned = cfg.rows_per_shard, _owner(cfg)
    domains = {spec.domain: {"train_rows": 0, "val_rows": 0, "tokens": 0, "supervised": 0, "shards": 0}
               for spec in cfg.data}
    corpus = {spec.domain: CorpusStats() for spec in cfg.data}
    mine = 0
    for split, domain, j, rows in _shard_rows(cfg, tokenizer, reading, corpus):
        d = domains[domain]
        d[f"{split}_rows"] += len(rows)
        d["tokens"] += sum(len(r) for r in rows)
        d["supervised"] += sum(int(r.supervised.sum()) for r in rows)
        d["shards"] += 1
        mine += owned(split, domain, j)
    for domain, stats in corpus.items():
        if stats.no_response or stats.truncated:
            domains[domain].update(skipped_no_response=stats.no_response, truncated=stats.truncated)
    tokens = sum(d["tokens"] for d in domains.values())
    return {
        "out": f"{cfg.out} ({state})",
        "teacher": f"{source.path} ({source.name}, vocab {source.vocab_size})",
        **({"teacher weights bytes": sum(f.stat().st_size for f in Path(cfg.teacher).glob("*")
                                         if f.suffix in (".safetensors", ".bin"))} if cfg.teacher else {}),
        "engine": {"vllm": f"vllm, reserves {cfg.gpu_memory_utilization or 'the default share of'} GPU memory "
                           f"(host RAM on CPU)",
                   "served": f"{len(cfg.teacher_url)} vLLM server(s), up to {cfg.max_concurrency} requests each"
                   }.get(cfg.backend, f"{cfg.backend}, dtype {cfg.dtype}"),
        "codec": f"{cfg.codec_name}, k {cfg.width}, seq_len {cfg.seq_len}, {R} rows per shard",
        "records": f"--format {cfg.format}, --train-on {cfg.train_on}, packing {cfg.packing}",
        "domains": domains,
        "tokens": tokens,
        "rows": sum(d["train_rows"] + d["val_rows"] for d in domains.values()),
        "shards": sum(d["shards"] for d in domains.values()),
        f"shards for worker {cfg.worker_index}/{cfg.num_workers}": mine,
        f"cache bytes, at most ({cfg.token_bytes_bound} B/token before compression)": tokens * cfg.token_bytes_bound,
    }


def _resolve(cfg: CaptureConfig) -> tuple[CaptureConfig, object, TeacherSource, Reading]:
    """(cfg with its backend and packing resolved, the teacher's tokenizer, the teacher, how records are read)
    after checking the teacher (or each of its servers), the data paths and the options that depend on the model;
    KdcacheError before any work otherwise."""
    out = Path(cfg.out)
    if "://" not in cfg.out and out.exists() and not out.is_dir():
        raise KdcacheError(f"--out {out}: exists and is not a directory")
    from .teachers import check_teacher, model_name, read_model_config, resolve_backend
    model_config = read_model_config(cfg.teacher) if cfg.teacher else {}
    for spec in cfg.data:                                                   # bad data paths fail before any work
        resolve_files(spec)
    template = load_template(cfg.chat_template) if cfg.chat_template else None
    packing = cfg.packing or ("isolated" if holds_conversations(cfg.data, cfg.text_field, cfg.format) else "concat")
    reading = Reading(cfg.format, cfg.train_on, template, packing, cfg.train_reasoning)
    if cfg.teacher_url:
        tokenizer = _load_tokenizer(cfg.tokenizer, "--tokenizer")
        return replace(cfg, backend="served", packing=packing), tokenizer, _served_source(cfg, tokenizer), reading
    tokenizer = _load_tokenizer(cfg.teacher)
    vocab = int(model_config["vocab_size"])
    if cfg.top_k > vocab:
        raise KdcacheError(f"--top-k {cfg.top_k} is above the teacher's vocabulary size {vocab}")
    max_pos = model_config.get("max_position_embeddings")
    if max_pos and cfg.seq_len > max_pos:
        raise KdcacheError(f"--seq-len {cfg.seq_len} is above the teacher's max_position_embeddings {max_pos}")
    cfg = replace(cfg, backend=resolve_backend(cfg.backend or ("hf" if cfg.targets == "sampled" else None)),
                  packing=packing)
    check_teacher(cfg.teacher, cfg.backend, len(tokenizer))
    if cfg.backend != "vllm" and cfg.tensor_parallel_size * cfg.pipeline_parallel_size > 1:
        raise KdcacheError(f"--tensor-parallel-size {cfg.tensor_parallel_size} / --pipeline-parallel-size "
                           f"{cfg.pipeline_parallel_size}: model parallelism needs --backend vllm (got {cfg.backend})")
    source = TeacherSource(path=str(Path(cfg.teacher).resolve()), name=model_name(cfg.teacher),
                           fingerprint=weights_fingerprint(cfg.teacher), vocab_size=vocab)
    return cfg, tokenizer, source, reading


def _served_source(cfg: CaptureConfig, tokenizer) -> TeacherSource:
    """The teacher behind cfg.teacher_url, every server checked (pipeline/served.py); its fingerprint is that of
    its top-k on a fixed probe."""
    from .served import ServedTeacher
    fleet = ServedTeacher(cfg.teacher_url, tokenizer, cfg.top_k, cfg.seq_len, cfg.max_concurrency,
                          cfg.request_timeout, cfg.drop_server_after)
    if cfg.top_k > fleet.vocab_size:
        fleet.close()
        raise KdcacheError(f"--top-k {cfg.top_k} is above the served teacher's vocabulary size {fleet.vocab_size}")
    return TeacherSource(path=" ".join(s.url for s in fleet.servers), name=fleet.name, fingerprint=fleet.fingerprint,
                         vocab_size=fleet.vocab_size, fleet=fleet)


def _identity(cfg: CaptureConfig, tokenizer, reading: Reading, source: TeacherSource) -> dict:
    """What decides the cache's bytes: the options (less RUNTIME_OPTIONS), the teacher (its weights, or for a
    served teacher its top-k on a probe), the data files, and the chat template that renders conversations (its
    sha256; None when there is none)."""
    identity = {k: v for k, v in _jsonable(asdict(cfg)).items() if k not in RUNTIME_OPTIONS}
    identity["codec"] = cfg.codec_name                                      # the default is named (v3 today)
    identity["teacher_fingerprint"] = source.fingerprint
    identity["tokenizer_fingerprint"] = tokenizer_fingerprint(tokenizer)
    identity["data_fingerprint"] = {spec.domain: files_fingerprint(resolve_files(spec)) for spec in cfg.data}
    try:
        identity["chat_template_fingerprint"] = template_fingerprint(resolve_template(tokenizer, reading.template, ""))
    except KdcacheError:                                                    # no template: text only
        identity["chat_template_fingerprint"] = None
    return identity


def identity_diff(a: dict, b: dict) -> list[str]:
    """The keys in which two capture identities differ. Inputs are compared by what they are (their fingerprints
    and the domains' names), not by the paths they were given as (LOCATIONS); a key only one of them has (written by
    another kdcache version) is not compared."""
    domains = lambda d: [spec["domain"] for spec in d.get("data", [])]  # noqa: E731
    keys = sorted(k for k in (set(a) & set(b)) - set(LOCATIONS) if a[k] != b[k])
    return keys + (["data"] if domains(a) != domains(b) else [])


def _streams(cfg: CaptureConfig) -> list[tuple[str, str]]:
    """The (split, domain) streams of the capture, in the order they are packed."""
    return [(split, spec.domain) for spec in cfg.data for split in ("train", "val")]


def _owner(cfg: CaptureConfig):
    """(split, domain, j) -> whether shard j of that stream is this worker's: round robin, each stream starting
    at its own offset so that small streams do not all land on worker 0."""
    offsets = {s: i for i, s in enumerate(sorted(_streams(cfg)))}
    return lambda split, domain, j: (j + offsets[(split, domain)]) % cfg.num_workers == cfg.worker_index


def _shard_rows(cfg: CaptureConfig, tokenizer, reading: Reading,
                corpus: dict[str, CorpusStats]) -> Iterator[tuple[str, str, int, list[Row]]]:
    """Every shard of the capture, all workers', as (split, domain, shard index j, its packed rows): rows
    [j*R, (j+1)*R) of the stream, in packing order (a stream's last shard may be short). Tokenisation runs ahead
    in a thread; corpus[domain] receives the domain's counts."""
    R = cfg.rows_per_shard
    for spec in cfg.data:
        pending: dict[str, list[Row]] = {"train": [], "val": []}
        done = {"train": 0, "val": 0}                                  # rows of the stream in earlier shards
        for split, _, row in _prefetched(iter_split_rows(spec, tokenizer, cfg.seq_len, cfg.split_seed,
                                                         cfg.val_fraction, cfg.text_field,
                                                         cfg.max_tokens_per_domain, corpus[spec.domain],
                                                         reading=reading), 4 * cfg.batch_size):
            pending[split].append(row)
            if len(pending[split]) == R:
                yield split, spec.domain, done[split] // R, pending[split]
                done[split], pending[split] = done[split] + R, []
        for split in ("train", "val"):
            if pending[split]:
                yield split, spec.domain, done[split] // R, pending[split]


def _start_engine(cfg: CaptureConfig, out: Path, rows: list[Row], source: TeacherSource):
    """(the started teacher engine, seconds its start took); its name, version and dtype are recorded in
    .progress/ so that a resumed run that starts none still knows them. vLLM checks its fast path on the first
    document (at most PROBE_TOKENS tokens) of the first PROBE_ROWS rows. A served teacher's fleet was checked
    by _resolve and starts nothing."""
    from .teachers import load_teacher
    t0 = time.perf_counter()
    options = _engine_options(cfg)
    if cfg.backend == "vllm":
        firsts = [r.input_ids[: r.doc_lengths[0] if r.doc_lengths else len(r)][:PROBE_TOKENS] for r in rows]
        options["probe"] = [ids for ids in firsts if len(ids) > 1][:PROBE_ROWS]
    teacher = source.fleet or load_teacher(cfg.teacher, cfg.backend, cfg.top_k, cfg.seq_len, cfg.dtype, **options)
    storage.write_json(out / PROGRESS_DIR / "engine.json",
                       {"name": teacher.engine, "version": teacher.engine_version, "dtype": teacher.dtype,
                        "output": getattr(teacher, "output", "")})
    return teacher, time.perf_counter() - t0


def _manifest(cfg: CaptureConfig, out: Path, tokenizer, codec, identity: dict,
              shards: dict[tuple[str, str], list[ShardInfo]], plan: dict[str, int], source: TeacherSource) -> Manifest:
    splits = {split: {} for split in ("train", "val")}
    for (split, domain), infos in shards.items():
        splits[split][domain] = DomainInfo(rows=sum(s.rows for s in infos), tokens=sum(s.tokens for s in infos),
                                           shards=sorted(infos, key=lambda s: s.path))
    # the engine that ran this part's shards (recorded when it started, so a resumed run still knows it)
    engine_path = out / PROGRESS_DIR / "engine.json"
    engine = json.loads(engine_path.read_text()) if engine_path.exists() else \
        {"name": cfg.backend, "version": "", "dtype": cfg.dtype}
    return Manifest(
        teacher=TeacherInfo(path=source.path, name=source.name,
                            fingerprint=identity["teacher_fingerprint"], engine=engine["name"],
                            engine_version=engine["version"], logprobs_mode="raw_logprobs", dtype=engine["dtype"],
                            output=engine.get("output", "")),
        tokenizer=TokenizerInfo.of(tokenizer, out),       # with the sha256 of out/tokenizer.json
        top_k=cfg.width, seq_len=cfg.seq_len, codec=codec.params(),
        split=SplitRule(rule=SPLIT_RULE, seed=cfg.split_seed, val_fraction=cfg.val_fraction),
        splits=splits, capture_config={**identity, "plan": plan}, created_by=f"kdcache {__version__}",
        packing=cfg.packing)


def _capture_shard(out: Path, rel: str, rows: list[Row], first_row: int, domain: str, teacher,
                   cfg: CaptureConfig, codec: TopkV1 | TopkV2 | TopkV3, bar: tqdm) -> ShardInfo:
    """Run the teacher over one shard's rows (batches aligned to the shard start) and commit the shard, keeping
    the teacher's distribution at supervised positions only. A writer thread encodes and writes each batch while
    the engine runs the next ones (at most WRITE_AHEAD waiting)."""
    writer = None

    def write(first: int, batch: list[Row], results) -> None:
        for i, (row, (ids, lps, target)) in enumerate(zip(batch, results.rows())):
            keep = row.supervised                                                  # (T,)
            writer.write({"row_index": first + i, "domain": domain, "input_ids": row.input_ids,
                          "topk_ids": np.where(keep[:, None], ids, 0),
                          "topk_logprobs": np.where(keep[:, None], lps, -np.inf).astype(np.float32),
                          "target_logprobs": np.where(keep, target, np.nan).astype(np.float32),
                          "doc_lengths": row.doc_lengths})
        bar.update(sum(len(r) for r in batch))

    try:
        writer = ShardWriter(out, rel, codec, row_group_rows=cfg.row_group_rows, packing=cfg.packing)
        # batches that may wait for the writer: enough to keep a served teacher's fleet busy
        ahead = max(WRITE_AHEAD, -(-getattr(teacher, "concurrency", 0) // cfg.batch_size))
        with ThreadPoolExecutor(1, thread_name_prefix="kdcache-writer") as pool:
            waiting: deque[Future] = deque()
            for b in range(0, len(rows), cfg.batch_size):
                batch = rows[b:b + cfg.batch_size]
                tokens, docs = [r.input_ids for r in batch], [r.doc_lengths for r in batch]
                if cfg.targets == "sampled":   # per-row seeds: the same draws on any worker and after a resume
                    seeds = [zlib.crc32(f"{cfg.split_seed}:{rel}:{first_row + b + i}".encode())
                             for i in range(len(batch))]
                    results = teacher.sample(tokens, cfg.samples, seeds, docs)
                else:
                    results = teacher.topk(tokens, cfg.top_k, docs, [r.supervised for r in batch])
                waiting.append(pool.submit(write, first_row + b, batch, results))
                while waiting and (len(waiting) > ahead or waiting[0].done()):
                    waiting.popleft().result()                         # re-raises a writer error here
            for f in waiting:
                f.result()
        info = writer.close()
    except BaseException as e:
        if writer is not None:
            writer.abort()
        (out / f"{rel}.tmp").unlink(missing_ok=True)        # a signal while the writer was opening it
        if (full := storage.out_of_space(out / rel, e)) is not None:
            raise full from None
        raise
    storage.write_json(out / PROGRESS_DIR / (rel + ".json"), asdict(info))
    return info


def _prefetched(items: Iterator, ahead: int) -> Iterator:
    """items, produced by a background thread up to `ahead` in advance (tokenisation overlaps the engine)."""
    q: queue.Queue = queue.Queue(ahead)
    end = object()

    def produce() -> None:
        try:
            for item in items:
                q.put((item, None))
            q.put((end, None))
        except BaseException as e:                                     # handed to the consumer, raised there
            q.put((end, e))

    threading.Thread(target=produce, name="kdcache-tokenizer", daemon=True).start()
    while True:
        item, error = q.get()
        if error is not None:
            raise error
        if item is end:
            return
        yield item


def _finished_shard(out: Path, rel: str) -> ShardInfo | None:
    """The ShardInfo of a shard a previous run committed, if its file is there and matches its record."""
    record = out / PROGRESS_DIR / (rel + ".json")
    if not record.exists() or not (out / rel).exists():
        return None
    info = ShardInfo(**json.loads(record.read_text()))
    if (out / rel).stat().st_size != info.bytes:
        return None
    return info


def staging_dir(url: str) -> Path:
    """Where a capture to `url` is staged: $KDCACHE_STAGING (default ~/.cache/kdcache/staging) / a hash of url."""
    root = Path(os.environ.get("KDCACHE_STAGING") or Path.home() / ".cache" / "kdcache" / "staging")
    return root / hashlib.sha256(url.encode()).hexdigest()[:16]


def _engine_options(cfg: CaptureConfig) -> dict:
    if cfg.backend != "vllm":
        return {}
    return {"gpu_memory_utilization": cfg.gpu_memory_utilization, "tensor_parallel_size": cfg.tensor_parallel_size,
            "pipeline_parallel_size": cfg.pipeline_parallel_size, "output": cfg.vllm_output,
            "enforce_eager": cfg.enforce_eager}


def _check_identity(out: Path, identity: dict) -> bool:
    """Whether `out` already holds the finished cache of this capture. KdcacheError if it holds a capture made with
    other options, or other files."""
    path = out / CONFIG_NAME
    if not path.exists():
        if out.is_dir() and any(p.name != PROGRESS_DIR for p in out.iterdir()):
            raise KdcacheError(f"--out {out}: directory is not empty and holds no kdcache capture")
        return False
    before = json.loads(path.read_text())
    diff = identity_diff(before, identity)
    if diff:
        details = "; ".join(f"{k}: {_short(before.get(k))} -> {_short(identity.get(k))}" for k in diff)
        raise KdcacheError(f"--out {out} holds a capture made with other settings ({details}); "
                           f"use another --out or the same options")
    return (out / MANIFEST_NAME).exists()


def _load_tokenizer(path: str, option: str = "--teacher"):
    tokenizer = load_tokenizer(path, f"{option} {path}")
    if tokenizer.eos_token_id is None:
        raise KdcacheError(f"{option} {path}: tokenizer has no eos token (needed to join documents)")
    return tokenizer


def _jsonable(d: dict) -> dict:
    return json.loads(json.dumps(d, default=lambda o: asdict(o) if hasattr(o, "__dataclass_fields__") else str(o)))


def _short(v) -> str:
    s = json.dumps(v)
    return s if len(s) <= 60 else s[:57] + "..."
