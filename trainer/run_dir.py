"""A training run's directory: config.json, metrics.jsonl, checkpoints/step-NNNNNNNN/state.pt, final/.

Every file is written atomically (cache_format.storage.atomic_path): a run killed at any moment resumes from its
last finished checkpoint, and `--resume` refuses a run started with other options, cache or starting student.
"""

import dataclasses
import json
import os
import re
import shutil
from pathlib import Path

import torch

from cache_format import Cache, KdcacheError, files_fingerprint, storage, weights_fingerprint
from trainer.config import RESUME_FREE, TrainConfig

# options naming where an input is: a resumed run may name them by another path (compared by fingerprint)
LOCATIONS = ("cache", "student", "out", "ddk_profile")

CHECKPOINT = re.compile(r"step-\d{8}")


def identity(cfg: TrainConfig, cache: Cache, world_size: int) -> dict:
    """What decides the run's results: the config (less RESUME_FREE), the number of ranks, the cache and the
    starting student."""
    config = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in RESUME_FREE + LOCATIONS}
    profile = Path(cfg.ddk_profile) if cfg.ddk_profile else None
    return {"config": config, "world_size": world_size, "cache_fingerprint": cache.fingerprint,
            "student_fingerprint": weights_fingerprint(cfg.student) if Path(cfg.student, "config.json").is_file()
            else None,
            "ddk_profile_fingerprint": files_fingerprint([profile]) if profile and profile.is_file() else None}


def prepare_run(run: Path, cfg: TrainConfig, ident: dict, write: bool = True) -> Path | None:
    """Create RUN and its config.json (the resolved config; not with write=False), or check it for --resume; the
    checkpoint to resume from, if any."""
    config_path = run / "config.json"
    if not cfg.resume:
        if config_path.exists():
            raise KdcacheError(f"{run}: already holds a training run (config.json); pass --resume to continue it "
                               f"or choose another --out")
        if write:
            storage.write_json(config_path, {**ident, "config": dataclasses.asdict(cfg), "resolved": {
                "warmup_steps": cfg.warmup, "loss_params": cfg.loss_params, "torch": torch.__version__}})
        return None
    if not config_path.exists():
        raise KdcacheError(f"--resume: {run} holds no training run (no config.json)")
    saved = json.loads(config_path.read_text())
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}    # options newer than the run's
    saved_config = {**defaults, **{k: v for k, v in saved["config"].items() if k not in RESUME_FREE}}
    diffs = [f"{k}: {saved_config.get(k)!r} -> {v!r}" for k, v in ident["config"].items()
             if saved_config.get(k) != v]                  # the inputs (LOCATIONS) by their fingerprints below
    for key, what in (("cache_fingerprint", "the cache"), ("student_fingerprint", "the starting student"),
                      ("ddk_profile_fingerprint", "the DDK profile")):
        if saved.get(key, ident[key]) != ident[key]:                         # (not recorded by older runs)
            diffs.append(f"{what} ({key} differs)")
    if saved.get("world_size", 1) != ident["world_size"]:
        diffs.append(f"world_size: {saved.get('world_size', 1)} -> {ident['world_size']} ranks")
    if diffs:
        raise KdcacheError(f"--resume: {run} was started with another configuration: {'; '.join(diffs)}")
    ckpt = latest_checkpoint(run)
    if ckpt is None:
        raise KdcacheError(f"--resume: no checkpoint in {run / 'checkpoints'} (train with --save-every N)")
    return ckpt


def latest_checkpoint(run: Path) -> Path | None:
    """The finished checkpoint with the highest step (unfinished ones are *.tmp and ignored)."""
    found = sorted(p for p in (run / "checkpoints").glob("step-*")
                   if CHECKPOINT.fullmatch(p.name) and (p / "state.pt").is_file())
    return found[-1] if found else None


def save_checkpoint(run: Path, step: int, state: dict, keep: int) -> None:
    """Write checkpoints/step-NNNNNNNN atomically (state.pt fsynced) and keep the newest `keep`."""
    final = run / "checkpoints" / f"step-{step:08d}"
    with storage.atomic_path(final) as tmp:
        tmp.mkdir()
        with open(tmp / "state.pt", "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
    for old in sorted(p for p in final.parent.glob("step-*") if CHECKPOINT.fullmatch(p.name))[:-keep]:
        shutil.rmtree(old)


def state_dicts(model, optimizer, fsdp: bool) -> tuple[dict, dict | None]:
    """(model, optimizer or None) state dicts to save. FSDP: full (unsharded) tensors on rank 0's CPU, {} on the
    other ranks; every rank must call it (it gathers)."""
    if not fsdp:
        return model.state_dict(), optimizer.state_dict() if optimizer else None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return (get_model_state_dict(model, options=options),
            get_optimizer_state_dict(model, optimizer, options=options) if optimizer else None)


def load_state(model, optimizer, state: dict, fsdp: bool) -> None:
    """Load a checkpoint's full model and optimizer state (FSDP: each rank keeps its shards)."""
    if not fsdp:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict
    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, state["model"], options=options)
    set_optimizer_state_dict(model, optimizer, state["optimizer"], options=options)


def save_final(run: Path, model, tokenizer, state_dict: dict | None = None) -> None:
    """save_pretrained into RUN/final, atomically (state_dict: FSDP's gathered full weights)."""
    with storage.atomic_path(run / "final") as tmp:
        model.save_pretrained(tmp, state_dict=state_dict)
        tokenizer.save_pretrained(tmp)


def read_metrics(path: Path, upto: int | None = None) -> list[dict]:
    """metrics.jsonl records (those with step <= upto when given: what a resumed run keeps)."""
    if not path.exists():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if upto is None or r["step"] <= upto]


def truncate_metrics(path: Path, upto: int) -> None:
    """Keep the records of steps <= upto (a resumed run rewrites what came after its checkpoint)."""
    with storage.atomic_path(path) as tmp:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in read_metrics(path, upto)))


class MetricsLog:
    """metrics.jsonl (one JSON record per logged step) and TensorBoard scalars under tb/, written by rank 0 alone
    (`enabled`). Opening it for a resumed run drops the records after the checkpoint's step."""

    def __init__(self, run: Path, start: int, enabled: bool):
        self.path, self.enabled = run / "metrics.jsonl", enabled
        self.file = self.tb = None
        if enabled:
            truncate_metrics(self.path, start)
            from torch.utils.tensorboard import SummaryWriter
            self.file, self.tb = open(self.path, "a"), SummaryWriter(run / "tb", purge_step=start + 1)

    def write(self, record: dict) -> None:
        """Append `record`; its numbers and domain weights go to TensorBoard at record["step"]."""
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        for key, value in record.items():
            if isinstance(value, (int, float)) and key != "step":
                self.tb.add_scalar(f"train/{key}", value, record["step"])
        for d, w in record["domain_weights"].items():
            self.tb.add_scalar(f"domain_weight/{d}", w, record["step"])

    def sync(self) -> None:
        """fsync metrics.jsonl (before a checkpoint, so a resumed run finds every record up to it)."""
        if self.enabled:
            self.file.flush()
            os.fsync(self.file.fileno())

    def __enter__(self) -> "MetricsLog":
        return self

    def __exit__(self, *exc) -> None:
        if self.enabled:
            self.file.close()
            self.tb.close()
