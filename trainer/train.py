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
CPU), final/ (save_pretrained student + tokenizer), eval.json and PNG plots.

Under torchrun (trainer/distributed.py) every rank runs this loop on its own slice of the cache with DDP, or FSDP2
with --fsdp; the loss statistics (so LATF's EMA) and DDK's val measurement are all-reduced, so every rank holds the
same weights; rank 0 alone writes RUN/, a checkpoint holds every rank's stream position and RNG.
"""

import contextlib
import dataclasses
import json
import logging
import math
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from cache_format import Cache, KdcacheError, open_cache, weights_fingerprint
from trainer import distributed
from trainer.data import CacheStream, PrefetchStream
from trainer.evaluate import evaluate
from trainer.losses import BUCKET_LOSSES, check_sampled_targets, chunked_buckets, masked_mean
from trainer.plots import plot_adakd, plot_domain_losses, plot_domain_weights, plot_losses
from trainer.adakd import LATF, AdaKDConfig, adakd_token_weights
from trainer.ddk import ddk_interval
from trainer.sampling import DDKSampler, FixedSampler, load_profile
from trainer.student import load_student, resolve_device

log = logging.getLogger("kdcache")

LOSS_NAMES = (*BUCKET_LOSSES, "ce")
SAMPLINGS = ("natural", "uniform", "ddk")
PRECISIONS = ("auto", "fp32", "bf16")
# Options that may change on --resume without changing the run's results.
RESUME_FREE = ("resume", "save_every", "keep_checkpoints", "log_every", "prefetch", "device", "eval_rows")


@dataclass(frozen=True)
class TrainConfig:
    cache: str
    student: str
    out: str
    loss: str = "fkl"                  # a BUCKET_LOSSES name, or "ce": plain continued pre-training (CPT)
    kd_weight: float | None = None     # None: 1.0, or DDK's gamma = 0.2 with sampling="ddk"
    ce_weight: float | None = None     # None: 0.0, or 1.0 with sampling="ddk" (DDK's Eq. 3: CE + gamma * KL)
    temperature: float = 1.0
    jsd_beta: float = 0.5
    skew_alpha: float = 0.1            # sfkl / srkl
    akl_mu: float = 0.5
    sampling: str = "natural"          # natural | uniform | ddk
    ddk_alpha: float = 0.5             # Eq. 2 smoothing
    ddk_interval: float | None = None  # steps between DDK updates (>= 1), a fraction of the run (< 1), None: ~30 updates
    ddk_val_rows: int = 32             # val rows per domain per DDK measurement
    ddk_profile: str | None = None     # start from a profile.json's weights instead of measuring at step 0
    adakd: bool = False                # AdaKD: LATF token focusing + IDTS per-token temperatures (tau_base = temperature)
    latf: bool = True                  # with adakd: distil only the hardest fraction of tokens
    idts: bool = True                  # with adakd: per-token temperatures from difficulty
    adakd_c: float = 0.5               # IDTS intensity: tau in [T e^-c, T e^c]
    adakd_beta: float = 0.99           # LATF: EMA decay of the distillation loss
    adakd_eps: float = 0.05            # LATF: tolerance band
    adakd_delta: float = 0.05          # LATF: multiplicative ratio step
    adakd_min_ratio: float = 0.1       # LATF: lowest ratio of tokens kept
    adakd_warmup_fraction: float = 0.05  # LATF: steps with ratio 1 before it adapts
    steps: int = 1000                  # optimizer steps
    batch_size: int = 8                # rows per micro-batch
    grad_accum: int = 1                # micro-batches per optimizer step
    lr: float = 3e-4
    min_lr_ratio: float = 0.1          # cosine decays to lr * min_lr_ratio
    warmup_steps: int | None = None    # None: 5 % of the steps
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    grad_clip: float = 1.0             # max gradient norm; 0 disables clipping
    seed: int = 0
    chunk_size: int = 1024             # positions per lm_head chunk
    precision: str = "auto"            # auto: bf16 autocast on GPU, fp32 on CPU
    gradient_checkpointing: bool = False
    compile: bool = False
    fsdp: bool = False                 # under torchrun: FSDP2 (fully_shard per decoder layer) instead of DDP
    device: str | None = None          # None: cuda if available, else cpu (under torchrun: cuda:LOCAL_RANK)
    save_every: int = 0                # checkpoint every N steps (0: none)
    keep_checkpoints: int = 2
    log_every: int = 1
    eval_rows: int = 64                # val rows per domain for the final eval (0: skip)
    prefetch: int = 2                  # batches read ahead on a background thread
    resume: bool = False

    def __post_init__(self):
        ddk = self.sampling == "ddk"
        if self.kd_weight is None:
            object.__setattr__(self, "kd_weight", 0.2 if ddk else 1.0)
        if self.ce_weight is None:
            object.__setattr__(self, "ce_weight", 1.0 if ddk else 0.0)

        def need(ok: bool, option: str, rule: str):
            if not ok:
                value = getattr(self, option)
                raise KdcacheError(f"--{option.replace('_', '-')} {value}: {rule}")

        need(self.loss in LOSS_NAMES, "loss", f"unknown loss (expected one of {', '.join(LOSS_NAMES)})")
        need(self.sampling in SAMPLINGS, "sampling", f"unknown sampling (expected one of {', '.join(SAMPLINGS)})")
        need(self.precision in PRECISIONS, "precision", f"expected one of {', '.join(PRECISIONS)}")
        for name in ("steps", "batch_size", "grad_accum", "chunk_size", "log_every", "keep_checkpoints"):
            need(getattr(self, name) >= 1, name, "must be >= 1")
        for name in ("save_every", "eval_rows", "prefetch", "kd_weight", "ce_weight", "weight_decay", "grad_clip"):
            need(getattr(self, name) >= 0, name, "must be >= 0")
        need(self.kd_weight + self.ce_weight > 0 or self.loss == "ce", "kd_weight", "kd and ce weights are both 0")
        need(self.lr > 0 and math.isfinite(self.lr), "lr", "must be a positive number")
        need(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", "must be in [0, 1]")
        need(self.warmup_steps is None or 0 <= self.warmup_steps <= self.steps, "warmup_steps",
             f"must be in [0, steps={self.steps}]")
        need(self.temperature > 0, "temperature", "must be > 0")
        need(0 <= self.jsd_beta <= 1, "jsd_beta", "must be in [0, 1] (0 = forward KL, 1 = reverse KL)")
        need(0 <= self.skew_alpha < 1, "skew_alpha", "must be in [0, 1)")
        need(0 < self.akl_mu <= 1, "akl_mu", "must be in (0, 1]")
        need(0 <= self.adam_beta1 < 1 and 0 <= self.adam_beta2 < 1, "adam_beta1", "Adam betas must be in [0, 1)")
        need(0 <= self.ddk_alpha <= 1, "ddk_alpha", "must be in [0, 1] (1 = no uniform floor)")
        need(self.ddk_interval is None or (0 < self.ddk_interval < 1 or float(self.ddk_interval).is_integer()
                                          and self.ddk_interval >= 1), "ddk_interval",
             "must be a number of steps >= 1 or a fraction of the run in (0, 1)")
        need(self.ddk_val_rows >= 1, "ddk_val_rows", "must be >= 1")
        need(self.ddk_profile is None or ddk, "ddk_profile", "needs --sampling ddk")
        need(not self.adakd or self.loss != "ce", "loss", "--adakd needs a distillation loss, not ce")
        self.adakd_config                                                       # validates the AdaKD options

    @property
    def warmup(self) -> int:
        return self.warmup_steps if self.warmup_steps is not None else self.steps // 20

    @property
    def adakd_config(self) -> AdaKDConfig | None:
        if not self.adakd:
            return None
        try:
            return AdaKDConfig(latf=self.latf, idts=self.idts, tau_base=self.temperature, c=self.adakd_c,
                               beta=self.adakd_beta, eps=self.adakd_eps, delta=self.adakd_delta,
                               min_ratio=self.adakd_min_ratio, warmup_fraction=self.adakd_warmup_fraction)
        except ValueError as e:        # "AdaKD: beta=1.0 is invalid, ..." -> "--adakd-beta 1.0 is invalid, ..."
            raise KdcacheError(re.sub(r"^AdaKD: (\w+)=", lambda m: f"--adakd-{m[1].replace('_', '-')} ", str(e)))

    @property
    def ddk_every(self) -> int:
        """Steps between DDK updates."""
        if self.ddk_interval is not None and self.ddk_interval < 1:
            return ddk_interval(self.steps, max(1, round(self.ddk_interval * self.steps)))
        return ddk_interval(self.steps, None if self.ddk_interval is None else int(self.ddk_interval))

    @property
    def loss_params(self) -> dict:
        return {"jsd": {"beta": self.jsd_beta}, "sfkl": {"alpha": self.skew_alpha},
                "srkl": {"alpha": self.skew_alpha}, "akl": {"mu": self.akl_mu}}.get(self.loss, {})


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
        report = _train(cfg, ranks, device)
    except BaseException:
        distributed.close(finished=False)
        raise
    distributed.close(finished=True)
    return report


def _train(cfg: TrainConfig, ranks: distributed.Dist, device: torch.device) -> dict:
    run = Path(cfg.out)
    cache = open_cache(cfg.cache)
    check_sampled_targets(cache.manifest.codec, cfg.loss, cfg.temperature, cfg.adakd)
    sampler = FixedSampler(cache, cfg.sampling) if cfg.sampling != "ddk" else DDKSampler(
        cache, cfg.ddk_alpha, cfg.ddk_every, load_profile(cfg.ddk_profile, cache, cfg.student)
        if cfg.ddk_profile else None)
    model, tokenizer = load_student(cfg.student, cache.manifest, device, dtype=torch.float32)
    vocab = cache.manifest.tokenizer.vocab_size
    lm_head = model.get_output_embeddings()
    if getattr(lm_head, "bias", None) is not None:
        raise KdcacheError(f"{cfg.student}: an output layer with a bias is not supported")
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    if cfg.compile:
        model.base_model.compile()
    student = distributed.wrap(_Distiller(model, vocab, cfg.chunk_size, buckets=cfg.loss != "ce"),
                               list(getattr(model.base_model, "layers", [])), cfg.fsdp, ranks, device)
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext

    torch.manual_seed(cfg.seed)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), fused=device.type == "cuda")
    latf = LATF.from_config(cfg.adakd_config, cfg.steps) if cfg.adakd else None
    stream = CacheStream(cache, "train", cfg.batch_size, cfg.seed, ranks.rank, ranks.world_size)  # sizes checked
    ckpt = distributed.on_main(lambda: _prepare_run(run, cfg, _identity(cfg, cache, ranks.world_size)),
                               ranks)                                          # after all input checks
    start = 0
    if ckpt is not None:
        state = torch.load(ckpt / "state.pt", map_location="cpu" if cfg.fsdp else device, weights_only=True)
        _load_state(model, optimizer, state, cfg.fsdp)
        stream.load_state_dict(state["stream"][ranks.rank])
        sampler.load_state_dict(state["sampler"])
        if latf is not None:
            latf.load_state_dict(state["adakd"])
        rng = state["rng"][ranks.rank]
        torch.set_rng_state(rng["torch"].cpu())
        if device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"].cpu(), device)
        start = state["step"]
        log.info("resuming %s from step %d (%s)", run, start, ckpt)
    tb = None                                                                   # rank 0 writes RUN/
    if ranks.main:
        _write_metrics(run / "metrics.jsonl", _read_metrics(run / "metrics.jsonl", upto=start))
        from torch.utils.tensorboard import SummaryWriter
        tb = SummaryWriter(run / "tb", purge_step=start + 1)
    # FSDP: the sharded root module runs the forwards (every rank takes part); else the local replica
    eval_model = student if cfg.fsdp else model
    measure = lambda: evaluate(cache, eval_model, "val", cfg.batch_size, cfg.ddk_val_rows, device,  # noqa: E731
                               ranks=ranks)
    started = sampler.start(measure) if ckpt is None else None                 # DDK: Eq. 1 before step 1
    if started:
        distributed.check_identical(sampler.weights, "DDK domain weights", ranks)
    t_run, trained_tokens = time.perf_counter(), 0
    with PrefetchStream(stream, cfg.prefetch) as batches, \
            open(run / "metrics.jsonl", "a") if ranks.main else contextlib.nullcontext() as metrics, \
            tqdm(total=cfg.steps, initial=start, desc="train", unit="step", mininterval=2.0,
                 disable=not ranks.main) as bar:
        for step in range(start, cfg.steps):
            t0 = time.perf_counter()
            lr = lr_at(step, cfg.lr, cfg.warmup, cfg.steps, cfg.min_lr_ratio)
            for group in optimizer.param_groups:
                group["lr"] = lr
            weights = dict(sampler.weights)
            stats, tokens, row_losses, row_domains = {}, 0, [], []
            ratio = latf.ratio if latf is not None else 1.0                   # LATF's focus for this step
            for i in range(cfg.grad_accum):
                batch = batches.next_batch(weights)
                if log.isEnabledFor(logging.DEBUG):                            # --debug: the rows trained on
                    log.debug("rank %d step %d rows %s", ranks.rank, step + 1,      # [[domain, epoch, row]]
                              json.dumps(list(zip(batch["domains"], batch["epoch"], batch["row_index"]))))
                _check_ids(batch, vocab, step)
                tokens += int(batch["attention_mask"].sum())                   # on the host: no sync
                batch = _to_device(batch, device)
                with distributed.grad_sync(student, i + 1 == cfg.grad_accum):  # reduce on the last micro-batch
                    with autocast():
                        loss, micro, row_loss = _micro_step(student, batch, cfg, ratio)
                    (loss / cfg.grad_accum).backward()
                for key, value in {"loss": loss.detach(), **micro}.items():
                    stats[key] = stats.get(key, 0.0) + value / cfg.grad_accum
                row_losses.append(row_loss)
                row_domains += batch["domains"]
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf"))
            grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm  # FSDP: DTensor
            means = torch.stack(list(stats.values()))                          # (S,) this rank's
            if ranks.world_size > 1:                                            # the mean over ranks, tokens summed
                summed = distributed.all_reduce_sum(torch.cat([means.double() / ranks.world_size,
                                                               means.new_tensor([tokens], dtype=torch.float64)]),
                                                    ranks)
                means, tokens = summed[:-1].float(), int(summed[-1])
            norm_v, *values = torch.cat([grad_norm.reshape(1).float(), means, *row_losses]).tolist()  # 1 sync
            stats, rows_v = dict(zip(stats, values)), values[len(stats):]
            loss_v, kd_v, ce_v = stats["loss"], stats["kd_loss"], stats["ce_loss"]
            domain_loss = {}
            for d, v in zip(row_domains, rows_v):
                domain_loss.setdefault(d, []).append(v)
            if not all(map(math.isfinite, (loss_v, kd_v, ce_v, norm_v))):
                bad = sorted(d for d, vs in domain_loss.items() if not all(map(math.isfinite, vs))) \
                    or sorted(domain_loss)                                  # a non-finite gradient: the whole batch
                raise KdcacheError(f"non-finite loss at step {step + 1} (loss {loss_v}, grad norm {norm_v}; "
                                   f"domains {', '.join(bad)}); stopped before the update. "
                                   f"Lower --lr or check the cache with `kdcache verify`")
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            record = {"step": step + 1, **stats, "lr": lr, "grad_norm": norm_v, "tokens": tokens,
                      "tokens_per_s": tokens / (time.perf_counter() - t0), "domain_weights": weights,
                      "domain_loss": {d: sum(vs) / len(vs) for d, vs in sorted(domain_loss.items())}}
            if latf is not None:
                latf.update(kd_v, step + 1)                                     # Eq. 6-7: the next step's ratio
                record["latf_ema"] = latf.ema
            updated = sampler.maybe_update(step + 1, measure)
            if updated:
                distributed.check_identical(sampler.weights, "DDK domain weights", ranks)
            record.update(started or {}, **(updated or {}))
            record["elapsed_s"] = time.perf_counter() - t_run                  # this process's loop, DDK included
            started = None
            trained_tokens += tokens
            if ranks.main and ((step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps):
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
                for key in ("lr", "grad_norm", "tokens_per_s", *stats):
                    tb.add_scalar(f"train/{key}", record[key], step + 1)
                for d, w in weights.items():
                    tb.add_scalar(f"domain_weight/{d}", w, step + 1)
            bar.set_postfix(loss=f"{loss_v:.4f}", tok_s=f"{record['tokens_per_s']:.0f}", refresh=False)
            bar.update(1)
            if cfg.save_every and (step + 1) % cfg.save_every == 0:
                agreed = {"sampler": sampler.state_dict(), "adakd": latf.state_dict() if latf is not None else None}
                distributed.check_identical(agreed, "DDK / AdaKD states", ranks)
                per_rank = distributed.gather({"stream": batches.state_dict(), "rng": {
                    "torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}}, ranks)
                model_state, optimizer_state = _state_dicts(model, optimizer, cfg.fsdp)   # FSDP: gathered
                if ranks.main:
                    metrics.flush()
                    os.fsync(metrics.fileno())
                    _save_checkpoint(run, cfg, step + 1, {
                        "step": step + 1, "model": model_state, "optimizer": optimizer_state, **agreed,
                        "stream": [r["stream"] for r in per_rank], "rng": [r["rng"] for r in per_rank]})
    if tb is not None:
        tb.close()
    elapsed = time.perf_counter() - t_run
    if cfg.steps > start:
        log.info("trained %d steps in %.1fs (%.0f tokens/s)", cfg.steps - start, elapsed,
                 trained_tokens / max(elapsed, 1e-9))
    full = _state_dicts(model, None, fsdp=True)[0] if cfg.fsdp else None      # FSDP: gathered for final/
    if ranks.main:
        _save_final(run, model, tokenizer, full)
        _plot(run, _read_metrics(run / "metrics.jsonl"))
    report = {}
    if cfg.eval_rows and cache.domains("val"):
        report = evaluate(cache, eval_model, "val", cfg.batch_size, cfg.eval_rows, device, ranks=ranks)
        if ranks.main:
            _write_json(run / "eval.json", report)
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

    def forward(self, input_ids, attention_mask, topk_ids=None, topk_logprobs=None):
        """With the teacher's topk_* (B, T, K): ((lp, lq, live) (B*T, K+1) each or None, ce (B*T,)). Without:
        the model's own output (logits (B, T, V): what evaluate() calls)."""
        if topk_ids is None:
            return self.model(input_ids=input_ids, attention_mask=attention_mask)
        hidden = self.model.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        B, T, D = hidden.shape                                                    # (B, T, D)
        K = topk_ids.shape[-1]
        targets = input_ids.roll(-1, dims=1)                                      # (B, T): position t -> token t+1
        return chunked_buckets(hidden.reshape(B * T, D), self.model.get_output_embeddings().weight,
                               topk_ids.reshape(B * T, K), topk_logprobs.reshape(B * T, K), targets.reshape(B * T),
                               self.chunk_size, self.vocab, buckets=self.buckets)


def _micro_step(student, batch: dict, cfg: TrainConfig, focus: float = 1.0):
    """(loss, stats, per-row loss (B,) detached) of one micro-batch; stats: detached 0-dim tensors ("kd_loss",
    "ce_loss", and AdaKD's when on). student: a (wrapped) _Distiller. focus: LATF's ratio of tokens to distil."""
    mask = batch["loss_mask"]                                                     # (B, T)
    B, T = mask.shape
    buckets, ce = student(batch["input_ids"], batch["attention_mask"], batch["topk_ids"],
                          batch["topk_logprobs"])                                 # (B*T, K+1) x3, (B*T,)
    mask = mask.reshape(B * T)
    kd_mask, adakd_stats = mask, {}
    if cfg.loss == "ce":
        kd, kd_weight, ce_weight = torch.zeros_like(ce), 0.0, 1.0
    elif cfg.adakd:
        lp, lq, live = buckets
        kd_mask, tau, adakd_stats = adakd_token_weights(lp, lq.detach(), live, mask, focus, cfg.adakd_config)
        kd = BUCKET_LOSSES[cfg.loss](lp, lq, live, tau if cfg.idts else cfg.temperature, **cfg.loss_params)
        kd_weight, ce_weight = cfg.kd_weight, cfg.ce_weight                       # KD on the focused tokens (Eq. 4)
    else:
        kd = BUCKET_LOSSES[cfg.loss](*buckets, cfg.temperature, **cfg.loss_params)  # (B*T,)
        kd_weight, ce_weight = cfg.kd_weight, cfg.ce_weight
    kd_loss, ce_loss = masked_mean(kd, kd_mask), masked_mean(ce, mask)
    loss = kd_weight * kd_loss + ce_weight * ce_loss
    per_position = (kd_weight * torch.where(kd_mask, kd, 0.0) + ce_weight * torch.where(mask, ce, 0.0)).detach()
    row_loss = per_position.reshape(B, T).sum(1) / mask.reshape(B, T).sum(1).clamp_min(1)  # (B,)
    return loss, {"kd_loss": kd_loss.detach(), "ce_loss": ce_loss.detach(), **adakd_stats}, row_loss


def _check_ids(batch: dict, vocab: int, step: int) -> None:
    top = int(batch["topk_ids"].max())
    if top >= vocab:
        raise KdcacheError(f"step {step + 1}: the cache holds teacher token id {top}, outside the tokenizer's "
                           f"vocabulary of {vocab} (domains {sorted(set(batch['domains']))})")


def _to_device(batch: dict, device: torch.device) -> dict:
    if device.type != "cuda":
        return batch
    return {k: v.pin_memory().to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


# The run directory.

def _identity(cfg: TrainConfig, cache: Cache, world_size: int) -> dict:
    """What decides the run's results: the config (less RESUME_FREE), the number of ranks, the cache and the
    starting student."""
    config = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in RESUME_FREE}
    return {"config": config, "world_size": world_size, "cache_fingerprint": cache.fingerprint,
            "student_fingerprint": weights_fingerprint(cfg.student) if Path(cfg.student, "config.json").is_file()
            else None}


def _prepare_run(run: Path, cfg: TrainConfig, identity: dict) -> Path | None:
    """Create RUN (or check it for --resume); the checkpoint to resume from, if any."""
    config_path = run / "config.json"
    if not cfg.resume:
        if config_path.exists():
            raise KdcacheError(f"{run}: already holds a training run (config.json); pass --resume to continue it "
                               f"or choose another --out")
        run.mkdir(parents=True, exist_ok=True)
        _write_json(config_path, {**identity, "config": dataclasses.asdict(cfg), "resolved": {
            "warmup_steps": cfg.warmup, "loss_params": cfg.loss_params, "torch": torch.__version__}})
        return None
    if not config_path.exists():
        raise KdcacheError(f"--resume: {run} holds no training run (no config.json)")
    saved = json.loads(config_path.read_text())
    saved_identity = {**saved, "config": {k: v for k, v in saved["config"].items() if k not in RESUME_FREE}}
    diffs = [f"{k}: {saved_identity['config'].get(k)!r} -> {v!r}" for k, v in identity["config"].items()
             if saved_identity["config"].get(k) != v]
    for key, what in (("cache_fingerprint", "the cache"), ("student_fingerprint", "the starting student")):
        if saved_identity.get(key) != identity[key]:
            diffs.append(f"{what} ({key} differs)")
    if saved.get("world_size", 1) != identity["world_size"]:
        diffs.append(f"world_size: {saved.get('world_size', 1)} -> {identity['world_size']} ranks")
    if diffs:
        raise KdcacheError(f"--resume: {run} was started with another configuration: {'; '.join(diffs)}")
    ckpt = latest_checkpoint(run)
    if ckpt is None:
        raise KdcacheError(f"--resume: no checkpoint in {run / 'checkpoints'} (train with --save-every N)")
    return ckpt


def latest_checkpoint(run: Path) -> Path | None:
    """The finished checkpoint with the highest step (unfinished ones are *.tmp and ignored)."""
    found = sorted(p for p in (run / "checkpoints").glob("step-*")
                   if re.fullmatch(r"step-\d{8}", p.name) and (p / "state.pt").is_file())
    return found[-1] if found else None


def _save_checkpoint(run: Path, cfg: TrainConfig, step: int, state: dict) -> None:
    """Write checkpoints/step-NNNNNNNN atomically (tmp dir + fsync + rename) and keep the newest keep_checkpoints."""
    final = run / "checkpoints" / f"step-{step:08d}"
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with open(tmp / "state.pt", "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in sorted(p for p in final.parent.glob("step-*") if re.fullmatch(r"step-\d{8}", p.name)
                      )[:-cfg.keep_checkpoints]:
        shutil.rmtree(old)


def _state_dicts(model, optimizer, fsdp: bool) -> tuple[dict, dict | None]:
    """(model, optimizer or None) state dicts to save. FSDP: full (unsharded) tensors on rank 0's CPU, {} on the
    other ranks; every rank must call it (it gathers)."""
    if not fsdp:
        return model.state_dict(), optimizer.state_dict() if optimizer else None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return (get_model_state_dict(model, options=options),
            get_optimizer_state_dict(model, optimizer, options=options) if optimizer else None)


def _load_state(model, optimizer, state: dict, fsdp: bool) -> None:
    """Load a checkpoint's full model and optimizer state (FSDP: each rank keeps its shards)."""
    if not fsdp:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict
    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, state["model"], options=options)
    set_optimizer_state_dict(model, optimizer, state["optimizer"], options=options)


def _save_final(run: Path, model, tokenizer, state_dict: dict | None = None) -> None:
    """save_pretrained into RUN/final (state_dict: FSDP's gathered full weights)."""
    tmp, final = run / "final.tmp", run / "final"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, state_dict=state_dict)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)


def _read_metrics(path: Path, upto: int | None = None) -> list[dict]:
    """metrics.jsonl records (those with step <= upto when given: what a resumed run keeps)."""
    if not path.exists():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if upto is None or r["step"] <= upto]


def _write_metrics(path: Path, records: list[dict]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    os.replace(tmp, path)


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def _plot(run: Path, records: list[dict]) -> None:
    if not records:
        return
    plot_losses(records, run / "loss.png")
    plot_domain_losses(records, run / "domain_loss.png")
    plot_domain_weights(records, run / "domain_weights.png")
    if "focus_ratio" in records[0]:
        plot_adakd(records, run / "adakd.png")
