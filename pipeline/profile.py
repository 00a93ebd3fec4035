"""`kdcache profile`: the student's gap to the teacher per domain on held-out data, and DDK's initial weights.

Student CE is measured with the student; teacher CE comes from the cache's target_logprobs (no teacher is loaded).
The result is written to profile.json (docs/algorithms.md, DDK):

    {"kind": "kdcache-profile", "version": 1, "split", "cache": {"path", "fingerprint"},
     "student": {"path", "fingerprint"}, "max_rows_per_domain",
     "domains": {D: {"tokens", "student_ce", "teacher_ce", "student_ppl", "teacher_ppl", "ratio", "kl", "weight"}},
     "weights": {D: w}}

`kdcache train --sampling ddk` starts from `load_profile(...)`, which refuses a profile of another cache or student.
"""

import json
import math
import os
from pathlib import Path

from cache_format import Cache, KdcacheError, open_cache, weights_fingerprint
from trainer.ddk import check_weights, initial_weights, perplexity_ratio
from trainer.evaluate import evaluate
from trainer.student import load_student

KIND, VERSION = "kdcache-profile", 1
VAL_HINT = "DDK needs val data per domain: capture with --val-fraction > 0"


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


def run_profile(cache_path, student_path, out_path, split: str = "val", batch_size: int = 8,
                max_rows_per_domain: int | None = None, device=None) -> dict:
    """Measure per-domain student and teacher CE on `split`, compute DDK's Eq. 1 weights, write `out_path` (JSON,
    atomically) and return the profile. max_rows_per_domain: validation budget in sequences per domain (None: all)."""
    if max_rows_per_domain is not None and max_rows_per_domain < 1:
        raise KdcacheError(f"max_rows_per_domain must be >= 1, got {max_rows_per_domain}")
    cache = open_cache(cache_path)
    domains = profile_domains(cache, split)
    model, _ = load_student(str(student_path), cache.manifest, device)
    report = evaluate(cache, model, split=split, batch_size=batch_size, max_rows_per_domain=max_rows_per_domain)
    stats = [report["domains"][d] for d in domains]
    student_ce = [s["student_ce"] for s in stats]
    teacher_ce = [s["teacher_ce"] for s in stats]
    ratio = perplexity_ratio(student_ce, teacher_ce).tolist()
    weights = initial_weights(student_ce, teacher_ce).tolist()
    per_domain = {
        d: {"tokens": s["tokens"], "student_ce": s["student_ce"], "teacher_ce": s["teacher_ce"],
            "student_ppl": _ppl(s["student_ce"]), "teacher_ppl": _ppl(s["teacher_ce"]), "ratio": r, "kl": s["kl"],
            "weight": w}
        for d, s, r, w in zip(domains, stats, ratio, weights)}
    result = {"kind": KIND, "version": VERSION, "split": split,
              "cache": {"path": str(cache_path), "fingerprint": cache.fingerprint},
              "student": {"path": str(student_path), "fingerprint": student_fingerprint(student_path)},
              "max_rows_per_domain": max_rows_per_domain, "domains": per_domain,
              "weights": dict(zip(domains, weights))}
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, out)
    return result


def student_fingerprint(path) -> str:
    """files_fingerprint of the student's config.json and weight files; KdcacheError if they cannot be read."""
    try:
        return weights_fingerprint(str(path))
    except OSError as e:
        raise KdcacheError(f"{path}: cannot fingerprint the student's weights ({e.strerror}: {e.filename})") from None


def _ppl(ce: float) -> float:
    return math.exp(min(ce, 700.0))     # exp(700) ~ 1e304: finite in JSON


def format_profile_table(profile: dict) -> str:
    """The profile as an aligned text table: domain, tokens, perplexities, ratio, KL, DDK weight."""
    lines = [f"{'domain':<16} {'tokens':>10} {'student_ppl':>12} {'teacher_ppl':>12} {'ratio':>10} {'kl':>8} "
             f"{'ddk_weight':>10}"]
    for name, d in profile["domains"].items():
        lines.append(f"{name:<16} {d['tokens']:>10} {d['student_ppl']:>12.6g} {d['teacher_ppl']:>12.6g} "
                     f"{d['ratio']:>10.4g} {d['kl']:>8.4f} {d['weight']:>10.4f}")
    return "\n".join(lines)


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
