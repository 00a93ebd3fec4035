"""The pretraining-style AdaKD ablation of docs/benchmarks.md as a markdown table, from bench_quality's run dirs.

    python scripts/adakd_ablation_table.py build/bq-heldout/runs "DDK (FKL)=ddk-fkl" "DDK (FKL)+AdaKD=a" ...

Each NAME=PREFIX names the runs PREFIX-s<seed>-<hash>; the first is the base. Per method, mean ± sd over seeds: the
val student CE averaged over domains (unweighted), the worst domain's gap to the teacher (student CE − teacher
CE), and AdaKD's state from metrics.jsonl (LATF's ratio at 50 % and 100 % of the steps, IDTS's τ range);
then each method minus the base, paired by seed.
"""

import json
import re
import statistics
import sys
from pathlib import Path


def report(eval_log: Path) -> dict:
    text = eval_log.read_text()
    return json.loads(text[text.index("{"):text.rindex("}") + 1])


def run_stats(run: Path) -> dict:
    domains = report(run.with_name(run.name + ".eval.log"))["domains"]
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {"ce": statistics.mean(d["student_ce"] for d in domains.values()),
            "gap": max(d["student_ce"] - d["teacher_ce"] for d in domains.values()),
            "ratio_mid": steps[len(steps) // 2 - 1].get("focus_ratio", 1.0),
            "ratio_end": steps[-1].get("focus_ratio", 1.0),
            "tau_min": min(s.get("tau_min", 1.0) for s in steps), "tau_max": max(s.get("tau_max", 1.0) for s in steps)}


def spread(xs: list[float]) -> str:
    return f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs):.3f}" if len(xs) > 1 else f"{xs[0]:.3f}"


def main() -> None:
    runs, methods = Path(sys.argv[1]), dict(a.split("=", 1) for a in sys.argv[2:])
    stats = {}
    for name, prefix in methods.items():
        found = sorted((int(m[1]), p) for p in runs.iterdir() if p.is_dir()
                       and (m := re.fullmatch(rf"{re.escape(prefix)}-s(\d+)-[0-9a-f]+", p.name)))
        stats[name] = {seed: run_stats(p) for seed, p in found}
    base = next(iter(stats))
    print("| method | seeds | mean val CE (nats) | worst-domain gap | LATF ratio at 50 % / 100 % | τ range |")
    print("|---|---|---|---|---|---|")
    for name, by_seed in stats.items():
        s = list(by_seed.values())
        print(f"| {name} | {len(s)} | {spread([x['ce'] for x in s])} | {spread([x['gap'] for x in s])} | "
              f"{statistics.mean(x['ratio_mid'] for x in s):.2f} / {statistics.mean(x['ratio_end'] for x in s):.2f} | "
              f"{min(x['tau_min'] for x in s):.2f}–{max(x['tau_max'] for x in s):.2f} |")
    print(f"\n| method − {base} (paired by seed) | Δ mean val CE | Δ worst-domain gap |\n|---|---|---|")
    for name, by_seed in list(stats.items())[1:]:
        seeds = sorted(set(by_seed) & set(stats[base]))
        delta = lambda k: spread([by_seed[i][k] - stats[base][i][k] for i in seeds])  # noqa: E731
        print(f"| {name} | {delta('ce')} | {delta('gap')} |")


if __name__ == "__main__":
    main()
