"""`kdcache profile`: the student's gap to the teacher per domain on held-out data, and DDK's initial weights.

Student CE is measured with the student; teacher CE comes from the cache's target_logprobs (no teacher is loaded).
The result is written to profile.json (docs/algorithms.md, DDK):

    {"kind": "kdcache-profile", "version": 1, "split", "cache": {"path", "fingerprint"},
     "student": {"path", "fingerprint"}, "max_rows_per_domain",
     "domains": {D: {"tokens", "student_ce", "teacher_ce", "student_ppl", "teacher_ppl", "ratio", "kl", "weight"}},
     "weights": {D: w}}

`kdcache train --sampling ddk --ddk-profile profile.json` starts from these weights (trainer.sampling.load_profile
refuses a profile of another cache or student).
"""

import json
import math
import os
from pathlib import Path

from cache_format import KdcacheError, open_cache
from trainer.ddk import initial_weights, perplexity_ratio
from trainer.evaluate import evaluate
from trainer.sampling import KIND, VERSION, profile_domains, student_fingerprint
from trainer.student import load_student

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
