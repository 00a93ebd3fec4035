"""`kdcache train`: one readable loop that distils a student from a cache. The teacher is never loaded.

Each optimizer step:
    weights = sampler.weights                                   domain mix: natural | uniform | ddk
    grad_accum times:
        batch  = stream.next_batch(weights)                     (B, T) ids + the teacher's (B, T, K) top-k
        hidden = student body(batch.input_ids)                  (B, T, D)
        buckets, ce = chunked_buckets(hidden, lm_head, ...)     (B*T, K+1) and (B*T,): (B, T, V) never at once
        loss = kd_weight * KD(buckets) + ce_weight * CE         masked means over positions with a teacher
        [AdaKD: KD only on LATF's hardest tokens, each at its IDTS temperature]
        backward
    clip, AdamW with warm-up + cosine LR, log a metrics.jsonl record, checkpoint every N steps;
    DDK: every K steps re-measure the student's val CE per domain and update the weights (Eq. 2)
    AdaKD: LATF moves its focus ratio from the EMA of the KD loss (Eq. 6-7)

RUN/ holds config.json (the resolved config and what it trained from), metrics.jsonl, tb/ (TensorBoard),
checkpoints/step-NNNNNNNN/state.pt (model, optimizer, data stream, sampler, RNG: `--resume` continues bitwise on
CPU), final/ (save_pretrained student + tokenizer), eval.json and PNG plots. The options live in trainer/config.py,
the run directory's files in trainer/run_dir.py; this module is the loop.

Under torchrun (trainer/distributed.py) every rank runs this loop on its own slice of the cache with DDP, or FSDP2
with --fsdp; the loss statistics (so LATF's EMA) and DDK's val measurement are all-reduced, so every rank holds the
same weights; rank 0 alone writes RUN/, a checkpoint holds every rank's stream position and RNG.
"""

import contextlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from cache_format import Cache, KdcacheError, open_cache, storage
from trainer import distributed
from trainer.adakd import LATF, adakd_token_weights
from trainer.config import TrainConfig
from trainer.cross_tokenizer import StudentRows
from trainer.data import CacheStream, PrefetchStream
from trainer.evaluate import evaluate
from trainer.losses import (BUCKET_LOSSES, check_sampled_targets, chunk_likelihood_kl, chunked_buckets,
                            kd_ce_objective)
from trainer.plots import plot_run
from trainer.profile import load_profile
from trainer.run_dir import (MetricsLog, identity, load_state, prepare_run, read_metrics, save_checkpoint, save_final,
                             state_dicts)
from trainer.sampling import DDKSampler, FixedSampler
from trainer.student import load_student, max_positions, resolve_device

log = logging.getLogger("kdcache")


def lr_at(step: int, lr: float, warmup: int, steps: int, min_ratio: float) -> float:
    """LR of optimizer step `step` (0-based): linear warm-up to `lr` over `warmup` steps, then cosine to
    lr * min_ratio at the last step."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - 1 - warmup)
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def run_train(cfg: TrainConfig) -> dict:
    """Train, write RUN/ (see the module docstring) and return the final eval report (or {})."""
    ranks, device = distributed.init(resolve_device(cfg.device), cfg.fsdp)
    try:
        with storage.exclusive(cfg.out, "kdcache train") if ranks.main else contextlib.nullcontext():
            report = _train(cfg, ranks, device)
    except BaseException:
        distributed.close(finished=False)
        raise
    distributed.close(finished=True)
    return report


@dataclass
class _Trainee:
    """What one run trains with, built once from the config (every input checked before RUN/ is touched)."""
    cache: Cache
    model: torch.nn.Module              # the HF student: parameters, state dicts, save_pretrained
    tokenizer: object
    student: torch.nn.Module            # _Distiller around the model, wrapped by DDP / FSDP2: the forwards
    optimizer: torch.optim.Optimizer
    sampler: FixedSampler | DDKSampler
    latf: LATF | None
    stream: CacheStream
    autocast: object                    # () -> context: bf16 autocast, or nothing
    eval_model: torch.nn.Module         # FSDP: the sharded root (every rank takes part); else the local replica
    vocab: int                          # the ids the student learns (its tokenizer's, or the teacher's if more)
    student_rows: StudentRows | None    # --cross-tokenizer: teacher rows -> the student's


def _train(cfg: TrainConfig, ranks: distributed.Dist, device: torch.device) -> dict:
    run = Path(cfg.out)
    t = _build(cfg, ranks, device)
    ckpt = distributed.on_main(lambda: prepare_run(run, cfg, identity(cfg, t.cache, ranks.world_size)), ranks)
    start = _restore(t, ckpt, cfg, ranks, device) if ckpt is not None else 0
    measure = lambda: evaluate(t.cache, t.eval_model, "val", cfg.batch_size, cfg.ddk_val_rows, device,  # noqa: E731
                               ranks=ranks, student_rows=t.student_rows)
    started = t.sampler.start(measure) if ckpt is None else None                # DDK: Eq. 1 before step 1
    if started:
        distributed.check_identical(t.sampler.weights, "DDK domain weights", ranks)
    t_run, trained_tokens = time.perf_counter(), 0
    with PrefetchStream(t.stream, cfg.prefetch) as batches, MetricsLog(run, start, ranks.main) as metrics, \
            tqdm(total=cfg.steps, initial=start, desc="train", unit="step", mininterval=2.0,
                 disable=not ranks.main) as bar:
        for step in range(start, cfg.steps):
            record = _optimizer_step(t, batches, step, cfg, ranks, device)
            if t.latf is not None:
                t.latf.update(record["kd_loss"], step + 1)                      # Eq. 6-7: the next step's ratio
                record["latf_ema"] = t.latf.ema
            updated = t.sampler.maybe_update(step + 1, measure)                 # DDK: Eq. 2 every K steps
            if updated:
                distributed.check_identical(t.sampler.weights, "DDK domain weights", ranks)
            record.update(started or {}, **(updated or {}))
            record["elapsed_s"] = time.perf_counter() - t_run                  # this process's loop, DDK included
            started, trained_tokens = None, trained_tokens + record["tokens"]
            if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
                metrics.write(record)
            bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}", refresh=False)
            bar.update(1)
            if cfg.save_every and (step + 1) % cfg.save_every == 0:
                _checkpoint(t, batches, metrics, step + 1, cfg, run, ranks, device)
    elapsed = time.perf_counter() - t_run
    if cfg.steps > start:
        log.info("trained %d steps in %.1fs (%.0f tokens/s)", cfg.steps - start, elapsed,
                 trained_tokens / max(elapsed, 1e-9))
    return _finish(t, cfg, run, ranks, device)


def plan_train(cfg: TrainConfig) -> dict:
    """--dry-run: check the inputs as run_train does (cache, student and its tokenizer, DDK profile, RUN/ or its
    checkpoint for --resume) and write nothing; the plan: steps, rows and tokens, epochs per domain at the starting
    weights, and an estimate of the memory a step needs."""
    cache, sampler = _open(cfg)
    model, tokenizer = load_student(cfg.student, cache, torch.device("cpu"), dtype=torch.float32,
                                    cross_tokenizer=cfg.cross_tokenizer)
    if cfg.cross_tokenizer:
        StudentRows.for_cache(cache, tokenizer, 0, cfg.student)                 # the cache and tokenizer checked
    world = int(os.environ.get("WORLD_SIZE", 1))
    CacheStream(cache, "train", cfg.batch_size, cfg.seed, 0, world)                      # sizes checked
    ckpt = prepare_run(Path(cfg.out), cfg, identity(cfg, cache, world), write=False)
    rows = cfg.steps * cfg.batch_size * cfg.grad_accum * world
    T, K = cache.manifest.seq_len, cache.manifest.top_k
    weights = sampler.weights if cfg.sampling != "ddk" or cfg.ddk_profile else None
    return {
        "out": f"{cfg.out} ({f'resumes from {ckpt.name}' if ckpt else 'new run'})",
        "objective": f"{cfg.kd_weight} x {cfg.loss} + {cfg.ce_weight} x ce" if cfg.loss != "ce" else "ce (CPT)",
        "sampling": cfg.sampling + (", weights measured before step 1" if weights is None else ""),
        "steps": cfg.steps,
        "rows per step": cfg.batch_size * cfg.grad_accum * world,
        "tokens": rows * T,
        "epochs per domain": {d: f"{rows * w / cache.manifest.splits['train'][d].rows:.2f} "
                                 f"({cache.manifest.splits['train'][d].rows:,} rows, weight {w:.3f})"
                              for d, w in (weights or {}).items()},
        "memory per rank, estimate": _memory_estimate(model, cfg, T, K, world),
    }


def _memory_estimate(model, cfg: TrainConfig, T: int, K: int, world: int) -> dict:
    """Bytes a training step holds, by part: fp32 weights + gradients + AdamW moments (16 B/param, FSDP: / ranks),
    activations (Korthikanti et al. 2022: 34 B per token, layer and hidden unit in 16-bit, twice that in fp32; with
    gradient checkpointing only the layer inputs), one lm_head chunk's logits in forward and backward (2 x chunk x V
    float32) and the batch's teacher top-k (8 B per entry)."""
    c = model.config
    params = sum(p.numel() for p in model.parameters())
    B, L, D, V = cfg.batch_size, c.num_hidden_layers, c.hidden_size, model.get_output_embeddings().weight.shape[0]
    per_unit = 34 if cfg.precision == "bf16" or cfg.precision == "auto" and resolve_device(cfg.device).type == "cuda" \
        else 68
    parts = {"weights, grads, AdamW bytes": 16 * params // (world if cfg.fsdp else 1),
             "activations bytes": B * T * D * (L * per_unit if not cfg.gradient_checkpointing else L * 4 + per_unit),
             "lm_head chunk bytes": 2 * min(cfg.chunk_size, B * T) * V * 4,
             "teacher top-k bytes": B * T * K * 8}
    return {**parts, "total bytes": sum(parts.values())}


def _open(cfg: TrainConfig) -> tuple[Cache, FixedSampler | DDKSampler]:
    """The cache, checked against the loss, and the domain sampler (a DDK profile checked against both)."""
    cache = open_cache(cfg.cache)
    check_sampled_targets(cache.manifest.codec, cfg.loss, cfg.temperature, cfg.adakd)
    sampler = FixedSampler(cache, cfg.sampling) if cfg.sampling != "ddk" else DDKSampler(
        cache, cfg.ddk_alpha, cfg.ddk_every, load_profile(cfg.ddk_profile, cache, cfg.student)
        if cfg.ddk_profile else None)
    return cache, sampler


def _build(cfg: TrainConfig, ranks: distributed.Dist, device: torch.device) -> _Trainee:
    cache, sampler = _open(cfg)
    model, tokenizer = load_student(cfg.student, cache, device, dtype=torch.float32,
                                    cross_tokenizer=cfg.cross_tokenizer)
    student_rows = StudentRows.for_cache(cache, tokenizer, max_positions(model), cfg.student) \
        if cfg.cross_tokenizer else None
    if getattr(model.get_output_embeddings(), "bias", None) is not None:
        raise KdcacheError(f"{cfg.student}: an output layer with a bias is not supported")
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    if cfg.compile:
        model.base_model.compile()
    vocab = len(tokenizer) if cfg.cross_tokenizer else max(cache.manifest.tokenizer.vocab_size, len(tokenizer))
    student = distributed.wrap(_Distiller(model, vocab, cfg.chunk_size, buckets=cfg.loss != "ce"),
                               list(getattr(model.base_model, "layers", [])), cfg.fsdp, ranks, device)
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    torch.manual_seed(cfg.seed)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), fused=device.type == "cuda")
    return _Trainee(
        cache=cache, model=model, tokenizer=tokenizer, student=student, optimizer=optimizer, sampler=sampler,
        latf=LATF.from_config(cfg.adakd_config, cfg.steps) if cfg.adakd else None,
        stream=CacheStream(cache, "train", cfg.batch_size, cfg.seed, ranks.rank, ranks.world_size,  # sizes checked
                           student_rows),
        autocast=(lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext,
        eval_model=student if cfg.fsdp else model, vocab=vocab, student_rows=student_rows)


def _restore(t: _Trainee, ckpt: Path, cfg: TrainConfig, ranks: distributed.Dist, device: torch.device) -> int:
    """Load a checkpoint into the run's parts; the step it was taken after."""
    state = torch.load(ckpt / "state.pt", map_location="cpu" if cfg.fsdp else device, weights_only=True)
    load_state(t.model, t.optimizer, state, cfg.fsdp)
    t.stream.load_state_dict(state["stream"][ranks.rank])
    t.sampler.load_state_dict(state["sampler"])
    if t.latf is not None:
        t.latf.load_state_dict(state["adakd"])
    rng = state["rng"][ranks.rank]
    torch.set_rng_state(rng["torch"].cpu())
    if device.type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"].cpu(), device)
    log.info("resuming %s from step %d (%s)", cfg.out, state["step"], ckpt)
    return state["step"]


def _optimizer_step(t: _Trainee, batches: PrefetchStream, step: int, cfg: TrainConfig, ranks: distributed.Dist,
                    device: torch.device) -> dict:
    """grad_accum micro-batches, clipping and one AdamW update; the step's metrics record."""
    t0 = time.perf_counter()
    lr = lr_at(step, cfg.lr, cfg.warmup, cfg.steps, cfg.min_lr_ratio)
    for group in t.optimizer.param_groups:
        group["lr"] = lr
    weights = dict(t.sampler.weights)
    focus = t.latf.ratio if t.latf is not None else 1.0                         # LATF's share of tokens to distil
    stats, tokens, row_losses, row_domains, aligned = {}, 0, [], [], {}
    for i in range(cfg.grad_accum):
        batch = batches.next_batch(weights)
        if log.isEnabledFor(logging.DEBUG):                                     # --debug: the rows trained on
            log.debug("rank %d step %d rows %s", ranks.rank, step + 1,          # [[domain, epoch, row]]
                      json.dumps(list(zip(batch["domains"], batch["epoch"], batch["row_index"]))))
        _check_ids(batch, t.vocab, step)
        tokens += int(batch["attention_mask"].sum())                            # on the host: no sync
        if "ce_mask" in batch:                                                  # cross-tokenizer: exactly aligned
            for d, n_aligned, n_trained in zip(batch["domains"], batch["loss_mask"].sum(1).tolist(),
                                               batch["ce_mask"].sum(1).tolist()):
                a, n = aligned.get(d, (0, 0))
                aligned[d] = (a + n_aligned, n + n_trained)
        with distributed.grad_sync(t.student, i + 1 == cfg.grad_accum):        # reduce on the last micro-batch
            with t.autocast():
                loss, micro, row_loss = _micro_step(t.student, _to_device(batch, device), cfg, focus)
            (loss / cfg.grad_accum).backward()
        for key, value in {"loss": loss.detach(), **micro}.items():
            stats[key] = stats.get(key, 0.0) + value / cfg.grad_accum
        row_losses.append(row_loss)
        row_domains += batch["domains"]
    grad_norm = torch.nn.utils.clip_grad_norm_(t.model.parameters(), cfg.grad_clip or float("inf"))
    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm   # FSDP: DTensor
    means, tokens = _mean_over_ranks(torch.stack(list(stats.values())), tokens, ranks)
    norm_v, *values = torch.cat([grad_norm.reshape(1).float(), means, *row_losses]).tolist()  # one host sync
    stats = dict(zip(stats, values))
    domain_loss = _domain_losses(row_domains, values[len(stats):])
    _check_finite(step, stats, norm_v, domain_loss)
    t.optimizer.step()
    t.optimizer.zero_grad(set_to_none=True)
    return {"step": step + 1, **stats, "lr": lr, "grad_norm": norm_v, "tokens": tokens,
            "tokens_per_s": tokens / (time.perf_counter() - t0), "domain_weights": weights,
            "domain_loss": {d: sum(vs) / len(vs) for d, vs in sorted(domain_loss.items())},
            **({"aligned_share": {d: a / max(n, 1) for d, (a, n) in sorted(aligned.items())}} if aligned else {})}


def _mean_over_ranks(means: torch.Tensor, tokens: int, ranks: distributed.Dist) -> tuple[torch.Tensor, int]:
    """(the mean over ranks of each rank's (S,) loss statistics, the tokens summed over ranks)."""
    if ranks.world_size == 1:
        return means, tokens
    summed = distributed.all_reduce_sum(torch.cat([means.double() / ranks.world_size,
                                                   means.new_tensor([tokens], dtype=torch.float64)]), ranks)
    return summed[:-1].float(), int(summed[-1])


def _domain_losses(row_domains: list[str], row_losses: list[float]) -> dict[str, list[float]]:
    """{domain: the losses of this rank's rows of that domain}."""
    out = {}
    for d, v in zip(row_domains, row_losses):
        out.setdefault(d, []).append(v)
    return out


def _check_finite(step: int, stats: dict, grad_norm: float, domain_loss: dict[str, list[float]]) -> None:
    """KdcacheError naming the step and the domains with a non-finite loss (all of them for a non-finite gradient
    alone), raised before the optimizer update."""
    loss, kd, ce = stats["loss"], stats["kd_loss"], stats["ce_loss"]
    if all(map(math.isfinite, (loss, kd, ce, grad_norm))):
        return
    bad = sorted(d for d, vs in domain_loss.items() if not all(map(math.isfinite, vs))) or sorted(domain_loss)
    raise KdcacheError(f"non-finite loss at step {step + 1} (loss {loss}, grad norm {grad_norm}; "
                       f"domains {', '.join(bad)}); stopped before the update. "
                       f"Lower --lr or check the cache with `kdcache verify`")


def _checkpoint(t: _Trainee, batches: PrefetchStream, metrics: MetricsLog, step: int, cfg: TrainConfig, run: Path,
                ranks: distributed.Dist, device: torch.device) -> None:
    """Save every rank's stream position and RNG with the (agreed) sampler and LATF states, model and optimizer."""
    agreed = {"sampler": t.sampler.state_dict(), "adakd": t.latf.state_dict() if t.latf is not None else None}
    distributed.check_identical(agreed, "DDK / AdaKD states", ranks)
    per_rank = distributed.gather({"stream": batches.state_dict(), "rng": {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}}, ranks)
    model_state, optimizer_state = state_dicts(t.model, t.optimizer, cfg.fsdp)   # FSDP: gathered
    if ranks.main:
        metrics.sync()
        save_checkpoint(run, step, {"step": step, "model": model_state, "optimizer": optimizer_state, **agreed,
                                    "stream": [r["stream"] for r in per_rank], "rng": [r["rng"] for r in per_rank]},
                        cfg.keep_checkpoints)


def _finish(t: _Trainee, cfg: TrainConfig, run: Path, ranks: distributed.Dist, device: torch.device) -> dict:
    """RUN/final, the plots and the val report (eval.json); returns the report ({} without val rows)."""
    full = state_dicts(t.model, None, fsdp=True)[0] if cfg.fsdp else None         # FSDP: gathered for final/
    if ranks.main:
        save_final(run, t.model, t.tokenizer, full)
        plot_run(run, read_metrics(run / "metrics.jsonl"))
    report = {}
    if cfg.eval_rows and t.cache.domains("val"):
        report = evaluate(t.cache, t.eval_model, "val", cfg.batch_size, cfg.eval_rows, device, ranks=ranks,
                          student_rows=t.student_rows)
        if ranks.main:
            storage.write_json(run / "eval.json", report)
        log.info("val: mean student CE %.4f (ppl %.2f), teacher CE %.4f, KL %.4f -> %s", report["mean"]["student_ce"],
                 report["mean"]["ppl"], report["mean"]["teacher_ce"], report["mean"]["kl"], run / "eval.json")
    log.info("wrote the student to %s", run / "final")
    return report


class _Distiller(torch.nn.Module):
    """The student's body and its chunked lm_head/bucket projection as one module: DDP and FSDP act on module
    calls (gradient hooks, parameter gathering), and the lm_head weight is used without calling the head."""

    def __init__(self, model, vocab: int, chunk_size: int, buckets: bool):
        super().__init__()
        self.model, self.vocab, self.chunk_size, self.buckets = model, vocab, chunk_size, buckets

    def forward(self, input_ids, position_ids, topk_ids=None, topk_logprobs=None, use_cache: bool = False):
        """With the teacher's topk_* (B, T, K): ((lp, lq, live) (B*T, K+1) each or None, ce (B*T,)). Without:
        the model's own output (logits (B, T, V): what evaluate() calls). position_ids (B, T) and no attention
        mask: transformers keeps the documents of a packed row (and the padding) apart (data.collate)."""
        if topk_ids is None:
            return self.model(input_ids=input_ids, position_ids=position_ids, use_cache=use_cache)
        hidden = self.model.base_model(input_ids=input_ids, position_ids=position_ids,
                                       use_cache=False).last_hidden_state
        B, T, D = hidden.shape                                                    # (B, T, D)
        K = topk_ids.shape[-1]
        targets = input_ids.roll(-1, dims=1)                                      # (B, T): position t -> token t+1
        return chunked_buckets(hidden.reshape(B * T, D), self.model.get_output_embeddings().weight,
                               topk_ids.reshape(B * T, K), topk_logprobs.reshape(B * T, K), targets.reshape(B * T),
                               self.chunk_size, self.vocab, buckets=self.buckets)


def _micro_step(student, batch: dict, cfg: TrainConfig, focus: float = 1.0):
    """(loss, stats, per-row loss (B,) detached) of one micro-batch; stats: detached 0-dim tensors ("kd_loss",
    "ce_loss", and AdaKD's when on). student: a (wrapped) _Distiller. focus: LATF's ratio of tokens to distil.
    A cross-tokenizer batch (data.collate) has KD on its exactly aligned positions (loss_mask), CE on ce_mask, and
    with --unaligned chunk the chunk-likelihood KL of its unaligned chunks among the KD positions."""
    mask = batch["loss_mask"]                                                     # (B, T)
    B, T = mask.shape
    ce_mask = batch.get("ce_mask", mask).reshape(B * T)                          # (B*T,)
    buckets, ce = student(batch["input_ids"], batch["position_ids"], batch["topk_ids"],
                          batch["topk_logprobs"])                                 # (B*T, K+1) x3, (B*T,)
    mask = mask.reshape(B * T)
    kd_mask, tau, adakd_stats = mask, cfg.temperature, {}
    if cfg.loss == "ce":
        kd, kd_weight, ce_weight = torch.zeros_like(ce), 0.0, 1.0
    else:
        if cfg.adakd:                                                             # LATF's tokens at IDTS's tau
            lp, lq, live = buckets
            kd_mask, tau, adakd_stats = adakd_token_weights(lp, lq.detach(), live, mask, focus, cfg.adakd_config)
        kd = BUCKET_LOSSES[cfg.loss](*buckets, tau, cfg.tau_squared, **cfg.loss_params)  # (B*T,)
        if cfg.cross_tokenizer and cfg.unaligned == "chunk":
            chunk_kl, last = chunk_likelihood_kl(ce, batch["chunk_id"].reshape(B * T),
                                                 batch["chunk_logprob"].reshape(B * T))
            kd, kd_mask = torch.where(last, chunk_kl, kd), kd_mask | last
        kd_weight, ce_weight = cfg.kd_weight, cfg.ce_weight
    loss, kd_loss, ce_loss, per_position = kd_ce_objective(kd, ce, kd_mask, ce_mask, kd_weight, ce_weight)
    row_loss = per_position.reshape(B, T).sum(1) / ce_mask.reshape(B, T).sum(1).clamp_min(1)  # (B,)
    return loss, {"kd_loss": kd_loss, "ce_loss": ce_loss, **adakd_stats}, row_loss


def _check_ids(batch: dict, vocab: int, step: int) -> None:
    top = int(batch["topk_ids"].max())
    if top >= vocab:
        raise KdcacheError(f"step {step + 1}: the cache holds teacher token id {top}, outside the tokenizer's "
                           f"vocabulary of {vocab} (domains {sorted(set(batch['domains']))})")


def _to_device(batch: dict, device: torch.device) -> dict:
    if device.type != "cuda":
        return batch
    return {k: v.pin_memory().to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
