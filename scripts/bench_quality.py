"""Distillation quality: the same student, equal steps, CPT vs KD vs DDK (vs AdaKD), per-domain val perplexity.

    python scripts/bench_quality.py [--work DIR] [--steps N] [--quick] [--pretrain-steps N] [--methods a,b,...]

1. the reference teacher, corpus and student: WORK/{corpus,teacher,student} from
   scripts/train_reference_teacher.py (built when missing; --teacher-steps);
2. the cache, through the CLI:
       python -m pipeline capture --backend hf --teacher WORK/teacher --data code=WORK/corpus/code.jsonl ...
           --top-k 64 --seq-len 128 --val-fraction 0.05 --out WORK/cache
3. optionally (--pretrain-steps N > 0) a "pretrained" student: WORK/student trained N steps with `--loss ce`,
   natural mix; every method then starts from it, as DDK's paper starts from pretrained students;
4. every method of METHODS: `python -m pipeline train` with the same student, seed, steps, batch size and lr;
5. `python -m pipeline eval --json` on the val split for each final student, the starting student(s), and the
   teacher's own val CE from the cache (the eval report's teacher_ce);
6. the table (rows = methods, columns = domains + average perplexity), printed and written to --doc
   (default docs/quality.md) with the command, machine, sizes, steps and seconds; a final JSON line.

A method is one line of METHODS: {name: kdcache train options}. Methods that need a TrainConfig field the trainer
does not have yet (AdaKD: `adakd`) are skipped with a note. Runs are kept under WORK/runs/<name>-<hash of the
options>; --reuse skips a run whose eval is already there (same options, same cache and student).
"""

import argparse
import dataclasses
import hashlib
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from pipeline.options import option_args  # noqa: E402
from trainer.run_dir import read_metrics  # noqa: E402

DOMAINS = ("code", "data", "prose", "arith")

# name: `kdcache train` options (TrainConfig field names; True = a flag). One line per method.
METHODS = {
    "CPT": dict(loss="ce"),
    "KD (natural)": dict(loss="fkl", sampling="natural"),
    "KD (uniform)": dict(loss="fkl", sampling="uniform"),
    "KD (CE+0.2 FKL)": dict(loss="fkl", sampling="natural", ce_weight=1.0, kd_weight=0.2),
    "DDK": dict(sampling="ddk"),                     # its preset: CE + 0.2 * FKL (Eq. 3)
    "DDK (FKL)": dict(sampling="ddk", loss="fkl", ce_weight=0.0, kd_weight=1.0),   # DDK sampling, KD's loss
    "KD+AdaKD": dict(loss="fkl", adakd=True),
    "DDK+AdaKD": dict(sampling="ddk", adakd=True),
}


def log(msg: str) -> None:
    print(msg, flush=True)


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-").replace("--", "-")


def env_for(threads: int) -> dict:
    env = dict(os.environ)
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def run_logged(cmd: list[str], logfile: Path, env: dict, progress=None, every: float = 20.0) -> float:
    """Run cmd with stdout+stderr into logfile; call progress() every `every` s; raise with the log's tail on
    failure. Returns the seconds it took."""
    t0 = time.perf_counter()
    with open(logfile, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
        while True:
            try:
                proc.wait(timeout=every)
                break
            except subprocess.TimeoutExpired:
                if progress:
                    progress(time.perf_counter() - t0)
    if proc.returncode:
        tail = "\n".join(logfile.read_text(errors="replace").splitlines()[-15:])
        raise RuntimeError(f"command failed (exit {proc.returncode}): {' '.join(cmd)}\n--- {logfile} ---\n{tail}")
    return time.perf_counter() - t0


def eval_json(cache: Path, student: Path, env: dict, logfile: Path) -> dict:
    cmd = [sys.executable, "-m", "pipeline", "eval", "--cache", str(cache), "--student", str(student), "--json",
           "--split", "val"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    logfile.write_text(r.stdout + r.stderr)
    if r.returncode:
        raise RuntimeError(f"eval failed: {' '.join(cmd)}\n{r.stderr[-2000:]}")
    return json.loads(r.stdout[r.stdout.index("{"):])


def train_fields() -> set[str]:
    from trainer.config import TrainConfig
    return {f.name for f in dataclasses.fields(TrainConfig)}


def avg_ppl(report: dict, domains) -> float:
    return sum(report["domains"][d]["ppl"] for d in domains) / len(domains)


def mean_report(reports: list[dict], domains) -> dict:
    """The mean over seeds of each domain's ppl and student_ce."""
    return {"domains": {d: {k: sum(r["domains"][d][k] for r in reports) / len(reports) for k in ("ppl", "student_ce")}
                        for d in domains}}


def table(rows: list[tuple[str, dict]], domains, teacher: dict, spread: dict | None = None) -> list[str]:
    """Markdown table: rows = (name, eval report), columns = domains + average perplexity (+ its range over seeds
    when `spread` {name: [avg ppl per seed]} is given)."""
    spread = spread or {}
    head = "| method | " + " | ".join(domains) + " | avg ppl |" + (" min-max over seeds |" if spread else "") + \
        " mean CE |"
    lines = [head, "|" + "---|" * (len(domains) + 3 + bool(spread))]
    for name, rep in rows:
        ppl = [rep["domains"][d]["ppl"] for d in domains]
        ce = sum(rep["domains"][d]["student_ce"] for d in domains) / len(domains)
        rng = (f" {min(spread[name]):.3f}-{max(spread[name]):.3f} |" if name in spread else " |") if spread else ""
        lines.append(f"| {name} | " + " | ".join(f"{v:.2f}" for v in ppl) + f" | {sum(ppl) / len(ppl):.3f} |" +
                     rng + f" {ce:.3f} |")
    t_ppl = [math.exp(teacher[d]) for d in domains]
    lines.append("| teacher | " + " | ".join(f"{v:.2f}" for v in t_ppl) + f" | {sum(t_ppl) / len(t_ppl):.3f} |" +
                 (" |" if spread else "") + f" {sum(teacher[d] for d in domains) / len(domains):.3f} |")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default=str(ROOT / "build" / "bench-quality"))
    p.add_argument("--quick", action="store_true", help="smoke run (~3 min): fewer steps, a small cache")
    p.add_argument("--steps", type=int, help="optimizer steps per method (default 1500; --quick 60)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seeds", default="0", help="comma-separated; every method runs once per seed (the table "
                   "shows the mean over seeds)")
    p.add_argument("--pretrain-steps", type=int, default=0,
                   help="CE pre-training of the student before every method (0: start from random init)")
    p.add_argument("--methods", help="subset (comma- or semicolon-separated) of: " + "; ".join(METHODS))
    p.add_argument("--extra", action="append", default=[], metavar="NAME=JSON",
                   help='an extra method, e.g. \'DDK K=5={"sampling": "ddk", "ddk_interval": 5}\'')
    p.add_argument("--teacher-steps", type=int, help="when the teacher must be built (default 600; --quick 40)")
    p.add_argument("--max-tokens-per-domain", type=int, help="capture cap (default none; --quick 20000)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (0: torch's default)")
    p.add_argument("--reuse", action="store_true", help="keep finished runs with the same options")
    p.add_argument("--doc", default=str(ROOT / "docs" / "quality.md"), help="markdown output ('' : none)")
    args = p.parse_args()
    steps = args.steps or (60 if args.quick else 1500)
    teacher_steps = args.teacher_steps or (40 if args.quick else 600)
    max_tokens = args.max_tokens_per_domain or (20000 if args.quick else None)
    work = Path(args.work + ("-quick" if args.quick and args.work == p.get_default("work") else ""))
    work.mkdir(parents=True, exist_ok=True)
    env = env_for(args.threads)
    py = sys.executable
    t_all = time.perf_counter()
    seconds = {}

    # 1. teacher, corpus, student
    if not (work / "teacher" / "config.json").exists() or not (work / "student" / "config.json").exists():
        log(f"[teacher] building the reference teacher into {work} ({teacher_steps} steps)")
        seconds["teacher"] = run_logged(
            [py, str(ROOT / "scripts" / "train_reference_teacher.py"), "--out", str(work), "--steps",
             str(teacher_steps), "--seed", "0", "--threads", str(args.threads)],
            work / "teacher.log", env, progress=lambda s: log(f"  [teacher] {s:.0f}s: " + (
                (work / "teacher.log").read_text().strip().splitlines() or [""])[-1][:110]), every=30)
        log(f"[teacher] done in {seconds['teacher']:.0f}s")
    teacher_report = json.loads((work / "teacher_report.json").read_text())

    # 2. cache
    cache = work / "cache"
    capture_cmd = [py, "-m", "pipeline", "capture", "--backend", "hf", "--teacher", str(work / "teacher"),
                   *[a for d in DOMAINS for a in ("--data", f"{d}={work / 'corpus' / f'{d}.jsonl'}")],
                   "--top-k", "64", "--seq-len", "128", "--val-fraction", "0.05", "--out", str(cache),
                   "--dtype", "float32"]
    if max_tokens:
        capture_cmd += ["--max-tokens-per-domain", str(max_tokens)]
    if not (cache / "manifest.json").exists():
        log("[capture] " + " ".join(capture_cmd[1:]))
        seconds["capture"] = run_logged(capture_cmd, work / "capture.log", env,
                                        progress=lambda s: log(f"  [capture] {s:.0f}s"), every=30)
        log(f"[capture] done in {seconds['capture']:.0f}s")
    manifest = json.loads((cache / "manifest.json").read_text())
    split_tokens = {s: {d: v["tokens"] for d, v in doms.items()} for s, doms in manifest["splits"].items()}
    cache_bytes = sum(f.stat().st_size for f in cache.rglob("*.parquet"))
    log(f"[cache] tokens {split_tokens}; {cache_bytes / 1e6:.1f} MB")
    domains = sorted(split_tokens["val"])

    # 3. methods
    fields = train_fields()
    methods = dict(METHODS)
    for spec in args.extra:
        cut = spec.find("={")
        if cut < 1:
            p.error(f"--extra {spec!r}: expected NAME={{json options}}")
        methods[spec[:cut]] = json.loads(spec[cut + 1:])
    chosen = [m.strip() for m in args.methods.split(";" if ";" in args.methods else ",")] if args.methods \
        else list(methods)
    unknown = [m for m in chosen if m not in methods]
    if unknown:
        p.error(f"unknown method(s) {unknown}; known: {list(methods)}")
    skipped = {}
    for m in chosen:
        missing = sorted(set(methods[m]) - fields)
        if missing:
            skipped[m] = f"TrainConfig has no field {', '.join(missing)} yet"
            log(f"[note] skipping {m}: {skipped[m]}")
    chosen = [m for m in chosen if m not in skipped]
    seeds = [int(x) for x in args.seeds.split(",")]
    reused: list[str] = []
    common = dict(steps=steps, batch_size=args.batch_size, lr=args.lr, eval_rows=0, log_every=1, prefetch=1)

    def train(name: str, student: Path, options: dict, seed: int) -> tuple[Path, float]:
        opts = {**common, "seed": seed, **options}
        key = hashlib.sha256(json.dumps([opts, str(student), manifest["tokenizer"], cache_bytes],
                                        sort_keys=True).encode()).hexdigest()[:8]
        run = work / "runs" / f"{slug(name)}-s{seed}-{key}"
        if args.reuse and (run / "final" / "config.json").exists() and (run / "done.json").exists():
            log(f"[train] {name} (seed {seed}): reusing {run}")
            reused.append(run.name)
            return run, json.loads((run / "done.json").read_text())["seconds"]
        shutil.rmtree(run, ignore_errors=True)
        run.parent.mkdir(parents=True, exist_ok=True)
        cmd = [py, "-m", "pipeline", "train", "--cache", str(cache), "--student", str(student), "--out", str(run),
               *option_args(opts)]
        log(f"[train] {name} (seed {seed}): kdcache train {' '.join(option_args(options))}")

        def progress(s):
            recs = read_metrics(run / "metrics.jsonl")
            if recs:
                r = recs[-1]
                w = " ".join(f"{d}={v:.2f}" for d, v in r.get("domain_weights", {}).items())
                log(f"  [{name}] step {r['step']}/{opts['steps']} loss {r['loss']:.3f} ({s:.0f}s) weights {w}")
        logfile = run.parent / f"{run.name}.log"
        sec = run_logged(cmd, logfile, env, progress=progress)
        (run / "done.json").write_text(json.dumps({"seconds": sec, "cmd": cmd}))
        return run, sec

    start_student = work / "student"
    evals: list[tuple[str, dict]] = []
    (work / "evals").mkdir(exist_ok=True)
    log("[eval] untrained student")
    evals.append(("student (random init)", eval_json(cache, start_student, env, work / "evals" / "student.log")))
    if args.pretrain_steps:
        run, sec = train("pretrain", start_student, dict(loss="ce", steps=args.pretrain_steps), seeds[0])
        seconds["pretrain"] = sec
        start_student = run / "final"
        evals.append((f"student (CE pre-trained {args.pretrain_steps} steps)",
                      eval_json(cache, start_student, env, work / "evals" / "pretrained.log")))
    teacher_ce = {d: evals[0][1]["domains"][d]["teacher_ce"] for d in domains}

    runs = {}                          # name: {"seconds", "report" (mean over seeds), "reports", "metrics"}
    n_runs, done = len(chosen) * len(seeds), 0
    for name in chosen:
        reports, secs, metrics = [], [], []
        for seed in seeds:
            run, sec = train(name, start_student, methods[name], seed)
            rep = eval_json(cache, run / "final", env, run.parent / f"{run.name}.eval.log")
            reports.append(rep)
            secs.append(sec)
            metrics.append(read_metrics(run / "metrics.jsonl"))
            done += 1
            log(f"  [{name}] seed {seed}: {sec:.0f}s; val ppl " + " ".join(
                f"{d} {rep['domains'][d]['ppl']:.2f}" for d in domains) + f"; avg {avg_ppl(rep, domains):.3f}   "
                f"({done}/{n_runs}, {time.perf_counter() - t_all:.0f}s total)")
        runs[name] = dict(seconds=sum(secs) / len(secs), report=mean_report(reports, domains), reports=reports,
                          metrics=metrics[0])
        seconds[name] = round(sum(secs) / len(secs), 1)

    # 4. report
    rows = evals + [(n, r["report"]) for n, r in runs.items()]
    spread = {n: [avg_ppl(r, domains) for r in runs[n]["reports"]] for n in runs} if len(seeds) > 1 else {}
    lines = table(rows, domains, teacher_ce, spread)
    gap_lines = ["| method | " + " | ".join(domains) + " |", "|" + "---|" * (len(domains) + 1)]
    for name, rep in rows:
        gap_lines.append(f"| {name} | " + " | ".join(
            f"{math.exp(rep['domains'][d]['student_ce'] - teacher_ce[d]):.2f}" for d in domains) + " |")
    mix_lines = ["| method | " + " | ".join(domains) + " |", "|" + "---|" * (len(domains) + 1)]
    for name, r in runs.items():
        ms = r["metrics"]
        if ms:
            mean_w = {d: sum(m["domain_weights"].get(d, 0.0) for m in ms) / len(ms) for d in domains}
            mix_lines.append(f"| {name} | " + " | ".join(f"{mean_w[d]:.2f}" for d in domains) + " |")
    ddk_path = {}                              # name: [(step, weights after the update, ratios measured)]
    for name, r in runs.items():
        ms = r["metrics"]
        path = []
        for i, m in enumerate(ms):
            if "ddk_ratio" in m:
                if m.get("ddk_updates") == 0:          # Eq. 1 before step 1: the weights step 1 used
                    path.append((0, m["domain_weights"], m["ddk_ratio"]))
                else:                                  # Eq. 2 after this step: the next step's weights
                    path.append((m["step"], ms[i + 1]["domain_weights"] if i + 1 < len(ms) else None,
                                 m["ddk_ratio"]))
        if path:
            ddk_path[name] = path
    t_total = time.perf_counter() - t_all
    import torch
    machine = (f"{platform.machine()} CPU, {os.cpu_count()} cores (shared), torch {torch.__version__}, "
               f"{args.threads or torch.get_num_threads()} torch thread(s) per process")
    shown, skip = [], False                    # the command without the options that do not change results
    for a in sys.argv[1:]:
        if skip or a == "--reuse":
            skip = False
            continue
        if a == "--doc":
            skip = True
            continue
        if not a.startswith("--doc="):
            shown.append(f"'{a}'" if any(c in a for c in " (){}\"") else a)
    cmd_line = "python scripts/bench_quality.py " + " ".join(shown)
    log(f"\nval perplexity after {steps} steps (batch {args.batch_size} x 128 tokens, lr {args.lr}, seeds {seeds}"
        f"{', from a CE pre-trained student' if args.pretrain_steps else ''}):")
    for line in lines:
        log(line)
    log("\nstudent/teacher perplexity ratio (DDK's gap):")
    for line in gap_lines:
        log(line)
    log("\nmean sampling weight over the run:")
    for line in mix_lines:
        log(line)
    for name, path in ddk_path.items():
        log(f"\n{name}: weights after each update (step: weights | ppl ratios measured):")
        for line in ddk_lines(path, domains, 4):
            log("  " + line)
    for m, why in skipped.items():
        log(f"(skipped {m}: {why})")

    result = {"steps": steps, "batch_size": args.batch_size, "seq_len": 128, "lr": args.lr, "seeds": seeds,
              "pretrain_steps": args.pretrain_steps, "threads": args.threads, "quick": args.quick,
              "teacher_ce": teacher_ce, "teacher": teacher_report.get("teacher"),
              "student": teacher_report.get("student"), "cache_tokens": split_tokens, "cache_bytes": cache_bytes,
              "ppl": {n: {d: rep["domains"][d]["ppl"] for d in domains} for n, rep in rows},
              "avg_ppl": {n: avg_ppl(rep, domains) for n, rep in rows},
              "avg_ppl_per_seed": spread,
              "skipped": skipped, "seconds": {k: round(v, 1) for k, v in seconds.items()},
              "total_seconds": round(t_total, 1), "reused_runs": len(reused), "teacher_seconds": teacher_report.get("seconds"),
              "machine": machine}
    (work / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    if args.doc:
        write_doc(Path(args.doc), cmd_line, machine, result, lines, gap_lines, mix_lines, ddk_path, domains,
                  skipped)
        log(f"\nwrote {args.doc}")
    print(json.dumps(result))


def ddk_lines(path, domains, ends: int | None = None) -> list[str]:
    """One line per DDK update; with `ends`, only the first and last `ends` updates."""
    def fmt(step, w, ratio):
        ws = " ".join(f"{d}={w[d]:.3f}" for d in domains) if w else "(end of run)"
        return f"{step:>5}: {ws} | " + " ".join(f"{d}={ratio[d]:.3g}" for d in domains)
    if ends and len(path) > 2 * ends:
        return [fmt(*e) for e in path[:ends]] + ["  ..."] + [fmt(*e) for e in path[-ends:]]
    return [fmt(*e) for e in path]


def write_doc(path: Path, cmd: str, machine: str, result: dict, lines, gap_lines, mix_lines, ddk_path, domains,
              skipped) -> None:
    """The generated part of docs/quality.md; the hand-written findings live between FINDINGS markers and are
    kept when the file is regenerated."""
    old = path.read_text() if path.exists() else ""
    findings = ""
    if "<!-- FINDINGS -->" in old:
        findings = old.split("<!-- FINDINGS -->")[1].split("<!-- /FINDINGS -->")[0]
    t, s = result["teacher"] or {}, result["student"] or {}
    out = [
        "# Distillation quality (`scripts/bench_quality.py`)", "",
        f"Command: `{cmd}`  ",
        f"Machine: {machine}.  ",
        f"Teacher: Llama {t.get('hidden')}d x {t.get('layers')} layers, {t.get('params', 0) / 1e6:.2f}M params, "
        f"{t.get('steps')} steps (scripts/train_reference_teacher.py). Student: Llama {s.get('hidden')}d x "
        f"{s.get('layers')} layers, {s.get('params', 0) / 1e6:.2f}M params, random init (seed-fixed)"
        f"{', CE pre-trained %d steps' % result['pretrain_steps'] if result['pretrain_steps'] else ''}.  ",
        f"Cache: top-64, seq 128, val fraction 0.05; train tokens {result['cache_tokens'].get('train')}, "
        f"val tokens {result['cache_tokens'].get('val')}, {result['cache_bytes'] / 1e6:.1f} MB.  ",
        f"Every method: {result['steps']} steps x batch {result['batch_size']} x 128 tokens, lr {result['lr']}, "
        f"seeds {result['seeds']} (the table: mean over seeds). Seconds per run: {result['seconds']}; total {result['total_seconds']:.0f}s "
        f"(building the teacher: {result['teacher_seconds']}s, when it is not there yet"
        + (f"; {result['reused_runs']} runs reused from an earlier invocation with --reuse, their seconds are "
           f"those of the original run" if result["reused_runs"] else "") + ").", "",
        "Validation perplexity per domain (the cache's val split, `kdcache eval --json`); avg ppl = mean over "
        "domains, mean CE = mean over domains of the student's CE in nats:", "", *lines, "",
        "Student ÷ teacher perplexity (the gap DDK samples by):", "", *gap_lines, "",
        "Mean sampling weight of each domain over the run:", "", *mix_lines, "",
    ]
    for name, pth in ddk_path.items():
        out += [f"{name}: weights after each update (step: weights | ppl ratios measured at that step):", "",
                "```", *ddk_lines(pth, domains), "```", ""]
    for m, why in skipped.items():
        out.append(f"Skipped {m}: {why}.  ")
    out += ["", "<!-- FINDINGS -->" + (findings or "\n## Findings\n\n(not written yet)\n") + "<!-- /FINDINGS -->", ""]
    path.write_text("\n".join(out))


if __name__ == "__main__":
    main()
