"""A deterministic, resumable stream of padded batches over a kdcache cache.

Every domain of a split has its own infinite row iterator. An epoch visits the domain's (shard, row group) units
in an order shuffled by (seed, epoch) and the rows of each unit in an order shuffled by (seed, epoch, unit); one
row group per domain is held in memory (plus the rows of the batch being built). When a domain runs out, its
epoch increments and it starts over.

Distributed runs: rank r of `world_size` reads the units at positions p of the epoch's shuffled order with
p % world_size == r; a domain with fewer units than ranks is split by row_index % world_size instead. Either way
every row is read exactly once per epoch across ranks.

Domain mixing: each batch slot b of batch number `step` draws its domain with
`choose_domain(weights, seed, step, b)`, the same draw on every rank and after a resume. Weights are passed per
batch, so a sampler (uniform, natural, DDK) can change them during training.

Use inside kdcache::

    stream = CacheStream(open_cache(path), "train", batch_size=8, seed=0, rank=rank, world_size=world_size)
    batch = stream.next_batch(natural_weights(stream.cache, "train"))
    state = stream.state_dict()          # JSON-able; CacheStream(...).load_state_dict(state) continues exactly

Use outside kdcache (plain PyTorch, or as an HF Trainer's train dataset), with fixed weights::

    from torch.utils.data import DataLoader
    from trainer.data import CacheBatches
    batches = CacheBatches("path/to/cache", "train", batch_size=8, seed=0, weights="natural")
    for batch in DataLoader(batches, batch_size=None):   # batching is done by the stream
        logits = model(batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits  # (B, T, V)
        ...  # KD loss on batch["topk_ids"], batch["topk_logprobs"] where batch["loss_mask"]

position_ids without an attention_mask keep packed documents (and the padding) apart; loss_mask marks the
supervised positions (for a chat cache: the responses).

The dataset is infinite unless `steps` is given. DataLoader workers are treated as extra ranks (each reads its
own disjoint slice). For read-ahead in a training loop, wrap the stream: `PrefetchStream(stream)` has the same
`next_batch` / `state_dict` / `load_state_dict` API and yields the same batches.
"""

import contextlib
import copy
import os
import queue
import threading
import zlib
from itertools import count
from typing import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from cache_format import Cache, CacheError, KdcacheError, ShardInfo, open_cache

Weights = dict[str, float] | np.ndarray


def check_cache(cache: Cache, split: str) -> None:
    """Cheap start-up check: every shard of `split` exists with the manifest's size; CacheError names the first bad one.

    The full sha256 check happens in the reader before each shard's first read.
    """
    for shard in cache.shards(split):
        cache.check_shard_size(shard)


def choose_domain(weights: np.ndarray, seed: int, step: int, slot: int) -> int:
    """Index of the domain for batch slot `slot` of batch `step`, drawn with probability proportional to `weights`.

    A pure function of its arguments (rng seeded with [seed, step, slot]): every rank and every resume agree.
    """
    weights = np.asarray(weights, dtype=np.float64)
    if weights.ndim != 1 or len(weights) == 0 or not np.all(np.isfinite(weights)) or np.any(weights < 0) \
            or weights.sum() <= 0:
        raise ValueError(f"domain weights must be finite, non-negative and not all zero, got {weights.tolist()}")
    rng = np.random.default_rng([seed, step, slot])
    return int(rng.choice(len(weights), p=weights / weights.sum()))


def natural_weights(cache: Cache, split: str) -> dict[str, float]:
    """Each domain's share of the split's tokens."""
    info = cache.manifest.splits[split]
    total = sum(info[d].tokens for d in cache.domains(split))
    return {d: info[d].tokens / total for d in cache.domains(split)}


def uniform_weights(cache: Cache, split: str) -> dict[str, float]:
    """The same weight for every domain of the split."""
    domains = cache.domains(split)
    return {d: 1.0 / len(domains) for d in domains}


class _DomainReader:
    """One domain's infinite, shuffled, rank-sliced row iterator. Position: (epoch, unit, row) = the next row."""

    def __init__(self, cache: Cache, split: str, domain: str, seed: int, rank: int, world_size: int):
        self.cache, self.domain, self.seed, self.rank, self.world_size = cache, domain, seed, rank, world_size
        self.key = zlib.crc32(domain.encode())          # stable across processes (unlike hash())
        self.units: list[tuple[ShardInfo, int]] = [
            (shard, g) for shard in cache.shards(split, domain) for g in range(cache.num_row_groups(shard))]
        self.split_rows = len(self.units) < world_size  # too few units: split each unit's rows instead
        rows = cache.manifest.splits[split][domain].rows
        if rows < world_size:
            raise KdcacheError(f"{cache.root}: domain {domain!r} of split {split!r} has {rows} rows, "
                               f"fewer than world_size={world_size}")
        self.epoch = self.unit = self.row = 0
        self._order: np.ndarray | None = None           # this epoch's unit indices for this rank
        self._rows: list[dict] | None = None            # the current unit's rows, shuffled

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "unit": self.unit, "row": self.row}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.unit, self.row = int(state["epoch"]), int(state["unit"]), int(state["row"])
        self._order = self._rows = None

    def next_row(self) -> dict:
        self._seek()
        row = {**self._rows[self.row], "epoch": self.epoch}
        self.row += 1
        self._seek()            # the position always names a row that exists, so the state's epoch is exact
        return row

    def _seek(self) -> None:
        """Load the unit at the position, moving past finished units and units holding none of this rank's rows."""
        while True:
            if self._order is None:
                perm = np.random.default_rng([self.seed, self.key, self.epoch]).permutation(len(self.units))
                self._order = perm if self.split_rows else perm[self.rank::self.world_size]
            if self._rows is None:
                self._rows = self._load(int(self._order[self.unit]))
            if self.row < len(self._rows):
                return
            self.unit, self.row, self._rows = self.unit + 1, 0, None
            if self.unit == len(self._order):
                self.epoch, self.unit, self._order = self.epoch + 1, 0, None

    def _load(self, unit: int) -> list[dict]:
        """This rank's rows of one unit, shuffled by (seed, domain, epoch, unit)."""
        rows = list(self.cache.read_row_group(*self.units[unit]))
        if self.split_rows:
            rows = [r for r in rows if r["row_index"] % self.world_size == self.rank]
        rng = np.random.default_rng([self.seed, self.key, self.epoch, unit])
        return [rows[i] for i in rng.permutation(len(rows))]


class CacheStream:
    """Padded batches of a split for one rank; `next_batch(weights)` draws each row's domain, then reads it."""

    def __init__(self, cache: Cache, split: str, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 student_rows: Callable[[dict], dict] | None = None):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} out of range for world_size {world_size}")
        check_cache(cache, split)
        self.cache, self.split, self.batch_size, self.seed = cache, split, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.domains = cache.domains(split)
        if not self.domains:
            raise CacheError(f"{cache.root}: split {split!r} has no rows")
        self.student_rows = student_rows                # cross-tokenizer: teacher row -> the student's (StudentRows)
        self.pad_id = cache.manifest.tokenizer.eos_id if student_rows is None else student_rows.pad_id
        self.step = 0                                   # batches consumed
        self._readers = {d: _DomainReader(cache, split, d, seed, rank, world_size) for d in self.domains}

    def weight_vector(self, weights: Weights) -> np.ndarray:
        """Weights as an array in `self.domains` order; a dict may omit domains (weight 0)."""
        if isinstance(weights, dict):
            unknown = set(weights) - set(self.domains)
            if unknown:
                raise ValueError(f"unknown domain(s) {sorted(unknown)} (split {self.split!r} has {self.domains})")
            return np.array([weights.get(d, 0.0) for d in self.domains], dtype=np.float64)
        weights = np.asarray(weights, dtype=np.float64)
        if weights.shape != (len(self.domains),):
            raise ValueError(f"expected {len(self.domains)} weights for {self.domains}, got shape {weights.shape}")
        return weights

    def next_batch(self, weights: Weights) -> dict:
        """input_ids (B, T) int64, attention_mask (B, T) int64, position_ids (B, T) int64, topk_ids (B, T, K)
        int64, topk_logprobs (B, T, K) float32, target_logprobs (B, T) float32, loss_mask (B, T) bool (see
        collate), domains, row_index and epoch (each row's pass over its domain) lists of B; T = longest row."""
        w = self.weight_vector(weights)
        picks = [self.domains[choose_domain(w, self.seed, self.step, b)] for b in range(self.batch_size)]
        rows = [self._readers[d].next_row() for d in picks]
        if self.student_rows is not None:
            rows = [self.student_rows(r) for r in rows]
        self.step += 1
        return collate(rows, self.pad_id)

    def state_dict(self) -> dict:
        """Everything needed to continue exactly (plain JSON-able python)."""
        return {"split": self.split, "batch_size": self.batch_size, "seed": self.seed, "rank": self.rank,
                "world_size": self.world_size, "step": self.step,
                "domains": {d: r.state_dict() for d, r in self._readers.items()}}

    def load_state_dict(self, state: dict) -> None:
        for key in ("split", "batch_size", "seed", "rank", "world_size"):
            if state[key] != getattr(self, key):
                raise ValueError(f"stream state has {key}={state[key]!r}, this stream has {getattr(self, key)!r}")
        if sorted(state["domains"]) != self.domains:
            raise ValueError(f"stream state has domains {sorted(state['domains'])}, the cache has {self.domains}")
        self.step = int(state["step"])
        for d, s in state["domains"].items():
            self._readers[d].load_state_dict(s)


class PrefetchStream:
    """Reads ahead of a CacheStream on a background thread (queue of `depth` batches) so the GPU never waits.

    Same API as CacheStream and the same batches: the thread reads with the last weights it was given; when
    `next_batch` gets other weights, the read-ahead is dropped and the stream rewinds to the state after the last
    consumed batch. `state_dict()` counts consumed batches, never prefetched ones. Call `close()` when done.
    Errors on the thread (a corrupt shard's CacheError) are raised unchanged by `next_batch`.
    """

    def __init__(self, stream: CacheStream, depth: int = 2):
        self.stream, self.depth = stream, depth
        self._state = stream.state_dict()               # after the last consumed batch
        self._weights: np.ndarray | None = None         # what the thread reads with
        self._thread: threading.Thread | None = None
        self._queue: queue.Queue = queue.Queue(depth)
        self._stop = threading.Event()

    def next_batch(self, weights: Weights) -> dict:
        w = self.stream.weight_vector(weights)
        if self._thread is None or not np.array_equal(w, self._weights):
            self._restart(w)
        batch, state, error = self._queue.get()
        if error is not None:
            self.close()
            raise error
        self._state = state
        return batch

    def state_dict(self) -> dict:
        return copy.deepcopy(self._state)

    def load_state_dict(self, state: dict) -> None:
        self.close()
        self.stream.load_state_dict(state)
        self._state = self.stream.state_dict()

    def close(self) -> None:
        """Stop the thread and rewind the stream to the last consumed batch."""
        if self._thread is not None:
            self._stop.set()
            while self._thread.is_alive():
                with contextlib.suppress(queue.Empty):
                    self._queue.get(timeout=0.01)       # unblock a pending put
            self._thread = None
            self._queue = queue.Queue(self.depth)
            self.stream.load_state_dict(self._state)

    def __enter__(self) -> "PrefetchStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _restart(self, weights: np.ndarray) -> None:
        self.close()
        self._weights, self._stop = weights, threading.Event()
        self._thread = threading.Thread(target=self._run, args=(weights, self._stop, self._queue), daemon=True)
        self._thread.start()

    def _run(self, weights: np.ndarray, stop: threading.Event, out: queue.Queue) -> None:
        while not stop.is_set():
            try:
                item = (self.stream.next_batch(weights), self.stream.state_dict(), None)
            except Exception as e:                      # handed to the consumer, raised there
                item = (None, None, e)
            while not stop.is_set():
                with contextlib.suppress(queue.Full):
                    out.put(item, timeout=0.05)
                    break
            if item[2] is not None:
                return


def collate(rows: list[dict], pad_id: int) -> dict:
    """Right-pad reader rows to the longest: pad_id tokens, -inf logprobs, NaN targets, loss_mask False.

    loss_mask is each row's `supervised` (the positions with a teacher distribution: every one but the last of a
    text row, the responses of a chat row). position_ids are the rows' own (restarting at 0 at each document of
    an isolated-packed row), the padding numbered 0, 1, ... as a document of its own: a model given position_ids
    and no attention_mask (transformers then builds block-diagonal causal attention) never lets a document or the
    padding attend to another. domains, row_index and epoch (None for rows not read by a CacheStream) are lists
    of B naming the rows. Student rows of a cross-tokenizer run (trainer/cross_tokenizer.py) add ce_mask (B, T)
    (their `trained`: the CE positions; loss_mask is then the exactly aligned ones), chunk_id (B, T) (made unique
    in the batch: row b's chunk c is b * T + c; -1 none) and chunk_logprob (B, T) (NaN padding).
    """
    B, T, K = len(rows), max(len(r["input_ids"]) for r in rows), rows[0]["topk_ids"].shape[1]
    input_ids = np.full((B, T), pad_id, np.int64)                       # (B, T)
    topk_ids = np.zeros((B, T, K), np.int64)                            # (B, T, K)
    topk_logprobs = np.full((B, T, K), -np.inf, np.float32)             # (B, T, K)
    target_logprobs = np.full((B, T), np.nan, np.float32)               # (B, T)
    loss_mask = np.zeros((B, T), bool)                                  # (B, T)
    lengths = np.array([len(r["input_ids"]) for r in rows])             # (B,)
    position_ids = np.arange(T)[None, :] - lengths[:, None]             # (B, T) the padding's, from 0
    for b, r in enumerate(rows):
        n = lengths[b]
        input_ids[b, :n] = r["input_ids"]
        topk_ids[b, :n] = r["topk_ids"]
        topk_logprobs[b, :n] = r["topk_logprobs"]
        target_logprobs[b, :n] = r["target_logprobs"]
        loss_mask[b, :n] = r["supervised"]
        position_ids[b, :n] = r["position_ids"]
    batch = {
        "input_ids": torch.from_numpy(input_ids),
        "attention_mask": torch.from_numpy((np.arange(T)[None, :] < lengths[:, None]).astype(np.int64)),
        "position_ids": torch.from_numpy(position_ids),
        "topk_ids": torch.from_numpy(topk_ids),
        "topk_logprobs": torch.from_numpy(topk_logprobs),
        "target_logprobs": torch.from_numpy(target_logprobs),
        "loss_mask": torch.from_numpy(loss_mask),
        "domains": [r["domain"] for r in rows],
        "row_index": [r["row_index"] for r in rows],
        "epoch": [r.get("epoch") for r in rows],
    }
    if "trained" in rows[0]:
        ce_mask, chunk_id = np.zeros((B, T), bool), np.full((B, T), -1, np.int64)             # (B, T) each
        chunk_logprob = np.full((B, T), np.nan, np.float32)                                    # (B, T)
        for b, r in enumerate(rows):
            n = lengths[b]
            ce_mask[b, :n] = r["trained"]
            chunk_id[b, :n] = np.where(r["chunk_id"] >= 0, r["chunk_id"] + b * T, -1)
            chunk_logprob[b, :n] = r["chunk_logprob"]
        batch.update(ce_mask=torch.from_numpy(ce_mask), chunk_id=torch.from_numpy(chunk_id),
                     chunk_logprob=torch.from_numpy(chunk_logprob))
    return batch


class CacheBatches(IterableDataset):
    """A torch IterableDataset of ready batches with fixed domain weights; use DataLoader(..., batch_size=None).

    weights: "natural", "uniform", or {domain: weight}. DataLoader workers act as extra ranks
    (rank * num_workers + worker_id of world_size * num_workers), so each reads a disjoint slice; `steps` (None:
    infinite) is the total number of batches over all workers.
    """

    def __init__(self, cache: Cache | str | os.PathLike, split: str, batch_size: int, seed: int,
                 weights: str | dict[str, float] = "natural", rank: int = 0, world_size: int = 1,
                 steps: int | None = None):
        self.cache = cache if isinstance(cache, Cache) else open_cache(cache)
        if weights not in ("natural", "uniform") and not isinstance(weights, dict):
            raise ValueError(f"weights must be 'natural', 'uniform' or a dict, got {weights!r}")
        self.split, self.batch_size, self.seed, self.weights = split, batch_size, seed, weights
        self.rank, self.world_size, self.steps = rank, world_size, steps

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        stream = CacheStream(self.cache, self.split, self.batch_size, self.seed,
                             rank=self.rank * workers + worker, world_size=self.world_size * workers)
        weights = {"natural": natural_weights, "uniform": uniform_weights}[self.weights](self.cache, self.split) \
            if isinstance(self.weights, str) else self.weights
        for _ in range(worker, self.steps, workers) if self.steps is not None else count():
            yield stream.next_batch(weights)
