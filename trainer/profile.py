"""`kdcache profile`: the student's gap to the teacher per domain on held-out data, and DDK's initial weights.

Student CE is measured with the student; teacher CE comes from the cache's target_logprobs (no teacher is loaded).
This module owns profile.json, its writer (run_profile) and its reader (load_profile):

    {"kind": "kdcache-profile", "version": 1, "split", "cache": {"path", "fingerprint"},
     "student": {"path", "fingerprint"}, "max_rows_per_domain", "config": {ProfileConfig},
     "domains": {D: {"tokens", "student_ce", "teacher_ce", "student_ppl", "teacher_ppl", "ratio", "kl", "weight"}},
     "weights": {D: w}}

`kdcache train --sampling ddk --ddk-profile profile.json` starts from these weights; load_profile refuses a
profile of another cache or student.
"""

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from cache_format import Cache, KdcacheError, open_cache, storage
from trainer.ddk import check_weights, initial_weights, perplexity, perplexity_ratio
from trainer.evaluate import evaluate
from trainer.student import load_student, student_fingerprint

KIND, VERSION = "kdcache-profile", 1
VAL_HINT = "DDK needs val data per domain: capture with --val-fraction > 0"


@dataclass(frozen=True)
class ProfileConfig:
    cache: str
    student: str
    out: str                                # profile.json to write
    split: str = "val"
    batch_size: int = 8
    max_rows_per_domain: int | None = None  # validation budget in sequences per domain (None: all)
    device: str | None = None               # None: cuda if available, else cpu

    def __post_init__(self):
        if self.max_rows_per_domain is not None and self.max_rows_per_domain < 1:
            raise KdcacheError(f"--max-rows-per-domain {self.max_rows_per_domain}: must be >= 1")
        if self.batch_size < 1:
            raise KdcacheError(f"--batch-size {self.batch_size}: must be >= 1")


def run_profile(cfg: ProfileConfig) -> dict:
    """Measure per-domain student and teacher CE on cfg.split, compute DDK's Eq. 1 weights, write cfg.out (JSON,
    atomically, with the config) and return the profile."""
    cache = open_cache(cfg.cache)
    domains = profile_domains(cache, cfg.split)
    model, _ = load_student(cfg.student, cache, cfg.device)
    report = evaluate(cache, model, split=cfg.split, batch_size=cfg.batch_size,
                      max_rows_per_domain=cfg.max_rows_per_domain)
    stats = [report["domains"][d] for d in domains]
    student_ce = [s["student_ce"] for s in stats]
    teacher_ce = [s["teacher_ce"] for s in stats]
    ratio = perplexity_ratio(student_ce, teacher_ce).tolist()
    weights = initial_weights(student_ce, teacher_ce).tolist()
    per_domain = {
        d: {"tokens": s["tokens"], "student_ce": s["student_ce"], "teacher_ce": s["teacher_ce"],
            "student_ppl": perplexity(s["student_ce"]), "teacher_ppl": perplexity(s["teacher_ce"]), "ratio": r,
            "kl": s["kl"], "weight": w}
        for d, s, r, w in zip(domains, stats, ratio, weights)}
    result = {"kind": KIND, "version": VERSION, "split": cfg.split,
              "cache": {"path": str(cfg.cache), "fingerprint": cache.fingerprint},
              "student": {"path": str(cfg.student), "fingerprint": student_fingerprint(cfg.student)},
              "max_rows_per_domain": cfg.max_rows_per_domain, "config": dataclasses.asdict(cfg),
              "domains": per_domain, "weights": dict(zip(domains, weights))}
    storage.write_json(cfg.out, result)
    return result


def format_profile_table(profile: dict) -> str:
    """The profile as an aligned text table: domain, tokens, perplexities, ratio, KL, DDK weight."""
    lines = [f"{'domain':<16} {'tokens':>10} {'student_ppl':>12} {'teacher_ppl':>12} {'ratio':>10} {'kl':>8} "
             f"{'ddk_weight':>10}"]
    for name, d in profile["domains"].items():
        lines.append(f"{name:<16} {d['tokens']:>10} {d['student_ppl']:>12.6g} {d['teacher_ppl']:>12.6g} "
                     f"{d['ratio']:>10.4g} {d['kl']:>8.4f} {d['weight']:>10.4f}")
    return "\n".join(lines)


def profile_domains(cache: Cache, split: str) -> list[str]:
    """The domains DDK weights: the train split's (those training samples from), each of which must have `split`
    rows; a cache without train rows is profiled over the split's own domains."""
    have = cache.domains(split)
    if not have:
        raise KdcacheError(f"{cache.root}: split {split!r} has no rows; {VAL_HINT}")
    train = cache.domains("train")
    missing = [d for d in train if d not in have]
    if missing:
        raise KdcacheError(f"{cache.root}: train domain(s) {', '.join(missing)} have no {split!r} rows; {VAL_HINT}")
    return train or have


def load_profile(path, cache: Cache, student_path) -> dict[str, float]:
    """DDK's initial weights {domain: w} from a profile.json; KdcacheError (one line naming the file) if it is not a
    profile, or was measured on another cache or student, or its domains are not the cache's train domains."""
    try:
        profile = json.loads(Path(path).read_text())
    except OSError as e:
        raise KdcacheError(f"{path}: cannot read the profile ({e.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise KdcacheError(f"{path}: malformed JSON ({e})") from None
    if not isinstance(profile, dict) or profile.get("kind") != KIND:
        raise KdcacheError(f"{path}: not a kdcache profile (expected kind {KIND!r}; write one with kdcache profile)")
    if profile.get("version") != VERSION:
        raise KdcacheError(f"{path}: unsupported profile version {profile.get('version')!r} (expected {VERSION})")
    try:
        cache_fp, student_fp = profile["cache"]["fingerprint"], profile["student"]["fingerprint"]
        weights = profile["weights"]
    except (KeyError, TypeError) as e:
        raise KdcacheError(f"{path}: malformed profile (missing field {e})") from None
    if cache_fp != cache.fingerprint:
        raise KdcacheError(f"{path}: measured on another cache ({profile['cache'].get('path')}), not {cache.root} "
                           f"(fingerprint {str(cache_fp)[:12]} vs {cache.fingerprint[:12]}); re-run kdcache profile")
    current = student_fingerprint(student_path)
    if student_fp != current:
        raise KdcacheError(f"{path}: measured with another student ({profile['student'].get('path')}), not "
                           f"{student_path} (fingerprint {str(student_fp)[:12]} vs {current[:12]}); "
                           f"re-run kdcache profile")
    if not isinstance(weights, dict):
        raise KdcacheError(f"{path}: malformed profile (weights must be a {{domain: weight}} mapping)")
    train = cache.domains("train")
    if sorted(weights) != train:
        raise KdcacheError(f"{path}: profile domains {sorted(weights)} differ from the cache's train domains {train}")
    try:
        w = check_weights([weights[d] for d in train], len(train))
    except (TypeError, ValueError) as e:
        raise KdcacheError(f"{path}: {e}") from None
    return dict(zip(train, w.tolist()))
