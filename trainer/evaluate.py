"""Per-domain evaluation of a student on a cache split (`kdcache eval`, DESIGN.md).

Over every position with a teacher distribution (the batch's loss_mask), per domain:
    student_ce  mean cross-entropy of the student on the actual next token
    teacher_ce  mean of -target_logprobs from the cache (the teacher's CE on the same tokens)
    kl          mean forward KL(teacher || student) on the K+1 buckets (logits_loss("fkl", ...))
                on a sampled cache (RS-KD) the sample estimate: KL plus a student-independent offset >= 0
                (trainer.losses.check_sampled_targets)
    ppl         exp(student_ce)
`mean` averages these over domains (each domain counts once) and sums `tokens`.
A cross-tokenizer student (student_rows, trainer/cross_tokenizer.py) is measured on its own tokens: the four
above over its exactly aligned positions (where the teacher predicted the same string), plus per domain
    aligned_share  the share of the student's trained positions that aligned exactly
    trained_ce     the student's cross-entropy over all of its trained positions
    ce_per_byte    the same summed over the bytes of the tokens it predicts: nats per byte, comparable across
                   tokenizers
With `generate` (conversations per domain), run_eval also scores replies with ROUGE-L (trainer.generate; greedy,
or sampled with `temperature`, `top_p`, `samples` seeded draws):
the student's in report["generate"]["student"] and as `rouge_l` per domain and in the mean; with `teacher`, the
teacher's own under report["generate"]["teacher"] (the ceiling).

Rows are read in cache order (domains sorted, shards and row groups in manifest order) and batched with
trainer.data.collate; one batch's logits exist at a time and the losses are computed in chunks of positions.
"""

import dataclasses
import math
from dataclasses import dataclass

import torch

from cache_format import Cache, CacheError, KdcacheError, open_cache, storage
from trainer.cross_tokenizer import StudentRows
from trainer.data import check_cache, collate
from trainer.ddk import perplexity
from trainer.distributed import Dist, all_reduce_sum
from trainer.generate import Decoding, generation_report
from trainer.losses import cross_entropy, logits_loss
from trainer.student import load_student, max_positions

KEYS = ("student_ce", "teacher_ce", "kl", "ppl")
CROSS_KEYS = ("aligned_share", "trained_ce", "ce_per_byte")


@dataclass(frozen=True)
class EvalConfig:
    cache: str
    student: str
    split: str = "val"
    batch_size: int = 8
    max_rows_per_domain: int | None = None   # None: every row
    out: str | None = None                   # also write the report, with this config, as JSON here
    device: str | None = None                # None: cuda if available, else cpu
    generate: int = 0                        # conversations per domain whose last reply is generated (0: off)
    max_new_tokens: int = 128                # per generated reply
    teacher: str | None = None               # HF model dir: its replies are scored too (the ceiling)
    temperature: float | None = None         # sample replies at this temperature (None: greedy)
    top_p: float = 1.0                       # with temperature: the nucleus sampled from
    samples: int = 1                         # with temperature: seeded draws, scored and averaged
    seed: int = 0                            # draw s uses seed + s
    cross_tokenizer: bool = False            # a student with another tokenizer (trainer/cross_tokenizer.py)

    def __post_init__(self):
        if self.generate < 0:
            raise KdcacheError(f"--generate {self.generate}: must be >= 0")
        if self.max_new_tokens < 1:
            raise KdcacheError(f"--max-new-tokens {self.max_new_tokens}: must be >= 1")
        if self.cross_tokenizer and self.generate:
            raise KdcacheError("--generate with --cross-tokenizer: replies are scored in the teacher's tokens; "
                               "generate with a same-tokenizer student")
        if self.temperature is not None and not (0 < self.temperature < math.inf):
            raise KdcacheError(f"--temperature {self.temperature}: must be a finite number > 0 (leave it out for "
                               "greedy replies)")
        if not 0 < self.top_p <= 1:
            raise KdcacheError(f"--top-p {self.top_p}: must be in (0, 1]")
        if self.samples < 1:
            raise KdcacheError(f"--samples {self.samples}: must be >= 1")
        if self.temperature is None and (self.samples != 1 or self.top_p != 1):
            flag = f"--samples {self.samples}" if self.samples != 1 else f"--top-p {self.top_p}"
            raise KdcacheError(f"{flag}: applies to sampled replies (greedy ones are the same every time); add "
                               "--temperature T")
        for flag, given in ((f"--teacher {self.teacher}", self.teacher is not None),
                            (f"--temperature {self.temperature}", self.temperature is not None)):
            if given and not self.generate:
                raise KdcacheError(f"{flag}: only applies to generated replies; add --generate N")

    @property
    def decoding(self) -> Decoding:
        return Decoding(self.temperature, self.top_p, self.samples, self.seed)


def run_eval(cfg: EvalConfig) -> dict:
    """`kdcache eval`: load the student (its tokenizer checked against the cache's) and return evaluate()'s report,
    with cfg.generate also the "generate" block (module doc); with cfg.out, also write it there (atomically) with
    the config under "config"."""
    cache = open_cache(cfg.cache)
    model, tokenizer = load_student(cfg.student, cache, cfg.device, cross_tokenizer=cfg.cross_tokenizer)
    student_rows = StudentRows.for_cache(cache, tokenizer, max_positions(model), cfg.student) \
        if cfg.cross_tokenizer else None
    gen = {}
    if cfg.generate:                 # first: a cache without replies is refused before the long CE pass
        split_domains(cache, cfg.split)
        gen["student"] = generation_report(cache, model, tokenizer, cfg.split, cfg.generate, cfg.max_new_tokens,
                                           batch_size=cfg.batch_size, decoding=cfg.decoding)
    report = evaluate(cache, model, split=cfg.split, batch_size=cfg.batch_size,
                      max_rows_per_domain=cfg.max_rows_per_domain, student_rows=student_rows)
    if cfg.generate:
        for name, stats in [*gen["student"]["domains"].items(), ("mean", gen["student"]["mean"])]:
            (report["mean"] if name == "mean" else report["domains"][name])["rouge_l"] = stats["rouge_l"]
        if cfg.teacher is not None:
            del model                                            # one model in memory at a time
            try:
                teacher, teacher_tok = load_student(cfg.teacher, cache, cfg.device)
            except KdcacheError as e:
                raise KdcacheError(f"--teacher: {e}") from None
            gen["teacher"] = generation_report(cache, teacher, teacher_tok, cfg.split, cfg.generate,
                                               cfg.max_new_tokens, batch_size=cfg.batch_size,
                                               decoding=cfg.decoding)
        report["generate"] = gen
    if cfg.out:
        storage.write_json(cfg.out, {**report, "config": dataclasses.asdict(cfg)})
    return report


def split_domains(cache: Cache, split: str) -> list[str]:
    """The split's domains after the cheap shard check; KdcacheError for a split without rows."""
    check_cache(cache, split)
    domains = cache.domains(split)
    if not domains:
        hint = " (capture with --val-fraction > 0 to get a val split)" if split == "val" else ""
        raise KdcacheError(f"{cache.root}: split {split!r} has no rows{hint}")
    return domains


def _batches(cache: Cache, split: str, domain: str, batch_size: int, max_rows: int | None, ranks: Dist,
             student_rows=None):
    """Batches of this rank's rows: row i of the first max_rows when i % world_size == rank (as the student's rows
    with student_rows)."""
    rows, pad_id = [], cache.manifest.tokenizer.eos_id if student_rows is None else student_rows.pad_id
    for i, row in enumerate(cache.iter_rows(split, domain)):
        if max_rows is not None and i >= max_rows:
            break
        if i % ranks.world_size != ranks.rank:
            continue
        rows.append(row if student_rows is None else student_rows(row))
        if len(rows) == batch_size:
            yield collate(rows, pad_id)
            rows = []
    if rows:
        yield collate(rows, pad_id)


def _model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


@torch.no_grad()                # not inference_mode: FSDP's gathered parameters outlive the call
def evaluate(cache: Cache, model, split: str = "val", batch_size: int = 8, max_rows_per_domain: int | None = None,
             device=None, chunk_size: int = 2048, ranks: Dist = Dist(), student_rows=None) -> dict:
    """{"split", "domains": {D: {"tokens", "student_ce", "teacher_ce", "kl", "ppl"}}, "mean": {same keys}}.

    device: where batches go (None: the model's device). chunk_size: positions per loss chunk.
    ranks: under torchrun every rank evaluates its share of the rows and the sums are all-reduced (the same report
    on every rank); every rank runs the same number of forwards (FSDP gathers parameters in each one).
    Raises CacheError naming a missing/truncated/corrupt shard, KdcacheError for an empty split or a student
    whose logits cannot cover the cache's ids. student_rows: a cross-tokenizer student's StudentRows (module doc).
    """
    if batch_size < 1:
        raise KdcacheError(f"batch_size must be >= 1, got {batch_size}")
    domains = split_domains(cache, split)
    device = torch.device(device) if device is not None else _model_device(model)
    was_training = model.training
    model.eval()
    report: dict = {"split": split, "domains": {}, "mean": {}}
    try:
        for domain in domains:
            n, s_ce, t_ce, kl, forwards, n_trained, trained_ce, n_bytes = 0, 0.0, 0.0, 0.0, 0, 0, 0.0, 0
            for batch in _batches(cache, split, domain, batch_size, max_rows_per_domain, ranks, student_rows):
                forwards += 1
                input_ids = batch["input_ids"].to(device)                                   # (B, T)
                logits = model(input_ids=input_ids, position_ids=batch["position_ids"].to(device),
                               use_cache=False).logits                                      # (B, T, V)
                mask = batch["loss_mask"].to(device)                                        # (B, T)
                targets = torch.roll(input_ids, -1, dims=1)                                 # (B, T) next token
                if "ce_mask" in batch:                                                      # cross-tokenizer
                    ce_mask = batch["ce_mask"].to(device)                                   # (B, T)
                    trained_logits, trained_targets = logits[ce_mask], targets[ce_mask]     # (M, V), (M,)
                    for s in range(0, len(trained_targets), chunk_size):
                        sl = slice(s, s + chunk_size)
                        trained_ce += cross_entropy(trained_logits[sl], trained_targets[sl]).double().sum().item()
                    n_trained += len(trained_targets)
                    n_bytes += int(student_rows.student.lengths[trained_targets.cpu().numpy()].clip(0).sum())
                    del trained_logits
                logits = logits[mask]                                                       # (N, V)
                targets = targets[mask]                                                     # (N,)
                topk_ids = batch["topk_ids"].to(device)[mask]                               # (N, K)
                topk_lps = batch["topk_logprobs"].to(device)[mask]                          # (N, K)
                target_lps = batch["target_logprobs"].to(device)[mask]                      # (N,)
                V = logits.shape[-1]
                if topk_ids.numel() and int(topk_ids.max()) >= V:
                    raise KdcacheError(f"the student has {V} output logits but the cache holds token id "
                                       f"{int(topk_ids.max())} (split {split!r}, domain {domain!r})")
                if not torch.isfinite(target_lps).all():
                    raise CacheError(f"{cache.root}: non-finite target_logprobs in split {split!r}, "
                                     f"domain {domain!r}")
                for s in range(0, logits.shape[0], chunk_size):
                    sl = slice(s, s + chunk_size)
                    s_ce += cross_entropy(logits[sl], targets[sl]).double().sum().item()
                    kl += logits_loss("fkl", logits[sl], topk_ids[sl], topk_lps[sl]).double().sum().item()
                t_ce += -target_lps.double().sum().item()
                n += int(mask.sum())
                del logits
            if ranks.world_size > 1:
                rows = min(cache.manifest.splits[split][domain].rows,
                           math.inf if max_rows_per_domain is None else max_rows_per_domain)
                for _ in range(math.ceil(math.ceil(rows / ranks.world_size) / batch_size) - forwards):
                    ones = torch.ones(1, 1, dtype=torch.long, device=device)       # (1, 1): keeps FSDP in step
                    model(input_ids=ones * cache.manifest.tokenizer.eos_id, position_ids=ones - 1, use_cache=False)
                n, s_ce, t_ce, kl, n_trained, trained_ce, n_bytes = all_reduce_sum(torch.tensor(
                    [n, s_ce, t_ce, kl, n_trained, trained_ce, n_bytes], dtype=torch.float64, device=device),
                    ranks).tolist()
                n = int(n)
            stats = {"tokens": n, "student_ce": s_ce / max(n, 1), "teacher_ce": t_ce / max(n, 1),
                     "kl": kl / max(n, 1)}
            stats["ppl"] = perplexity(stats["student_ce"])
            if student_rows is not None:
                stats.update(aligned_share=n / max(n_trained, 1), trained_ce=trained_ce / max(n_trained, 1),
                             ce_per_byte=trained_ce / max(n_bytes, 1))
            report["domains"][domain] = stats
    finally:
        model.train(was_training)
    per = report["domains"].values()
    report["mean"] = {"tokens": sum(d["tokens"] for d in per),
                      **{k: sum(d[k] for d in per) / len(report["domains"]) for k in KEYS + CROSS_KEYS
                         if k in next(iter(per))}}
    return report
