"""`kdcache train`'s options: one frozen dataclass, checked on construction (one-line KdcacheError naming the
option), from which the CLI derives its flags and defaults."""

import math
import re
from dataclasses import dataclass
from functools import cached_property

from cache_format import KdcacheError
from trainer.adakd import AdaKDConfig
from trainer.ddk import ddk_interval
from trainer.losses import BUCKET_LOSSES

LOSS_NAMES = (*BUCKET_LOSSES, "ce")
SAMPLINGS = ("natural", "uniform", "ddk")
PRECISIONS = ("auto", "fp32", "bf16")
UNALIGNED = ("chunk", "skip")          # cross-tokenizer: unaligned chunks distilled by their likelihood, or left out
# Options that may change on --resume without changing the run's results.
RESUME_FREE = ("resume", "save_every", "keep_checkpoints", "log_every", "prefetch", "device", "eval_rows")


@dataclass(frozen=True)
class TrainConfig:
    cache: str
    student: str
    out: str
    loss: str = "fkl"                  # a BUCKET_LOSSES name, or "ce": plain continued pre-training (CPT)
    kd_weight: float | None = None     # None: 1.0, or DDK's gamma = 0.2 with sampling="ddk"
    ce_weight: float | None = None     # None: 0.0; 1.0 with sampling="ddk" (DDK's Eq. 3: CE + gamma * KL) or
                                       # cross_tokenizer (the student's own tokens: docs/benchmarks.md)
    temperature: float = 1.0
    tau_squared: bool = True           # tempered losses weighted by tau^2 (Hinton; AdaKD's code); off: weight 1
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
    cross_tokenizer: bool = False      # a student with another tokenizer: aligned by byte spans (cross_tokenizer.py)
    unaligned: str = "chunk"           # cross-tokenizer: KD on unaligned chunks (chunk likelihood) or none (skip)

    def __post_init__(self):
        ddk = self.sampling == "ddk"
        if self.kd_weight is None:
            object.__setattr__(self, "kd_weight", 0.2 if ddk else 1.0)
        if self.ce_weight is None:
            object.__setattr__(self, "ce_weight", 1.0 if ddk or self.cross_tokenizer else 0.0)

        def need(ok: bool, option: str, rule: str):
            if not ok:
                value = getattr(self, option)
                raise KdcacheError(f"--{option.replace('_', '-')} {value}: {rule}")

        need(self.loss in LOSS_NAMES, "loss", f"unknown loss (expected one of {', '.join(LOSS_NAMES)})")
        need(self.sampling in SAMPLINGS, "sampling", f"unknown sampling (expected one of {', '.join(SAMPLINGS)})")
        need(self.unaligned in UNALIGNED, "unaligned", f"expected one of {', '.join(UNALIGNED)}")
        need(not (self.cross_tokenizer and self.ddk_profile), "ddk_profile",
             "a profile is measured on the teacher's tokens; with --cross-tokenizer DDK measures its own start")
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

    @cached_property
    def adakd_config(self) -> AdaKDConfig | None:
        """Built (and checked) once, in __post_init__."""
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
