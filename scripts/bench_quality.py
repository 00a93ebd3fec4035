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

Instruction rows (`--instruction`): on one conversation domain (ASSETS/corpus/DOMAIN.jsonl, distilled on the
replies), a CE-warmed-up student is distilled by each method of INSTRUCTION_GRID (AdaKD's paper's grid: FKL and
RKL with and without AdaKD, LATF or IDTS alone on RKL, and plain CE as the no-teacher baseline) over 5 seeds, and
scored on the val split by `kdcache eval --generate`: the reply-only CE and KL, the ROUGE-L of greedy replies and of
sampled ones (--temperature 1, --samples 5: the paper's measure), mean ± sd over seeds and AdaKD minus its base
loss paired by seed, plus LATF's focus ratio and IDTS's temperature range from each run's metrics.jsonl, and a PNG
of ROUGE-L by method. --full-vocab runs the grid again on a full-vocabulary cache of the same teacher (codec v1,
--top-k V), where the tempered losses are exact. It writes its section (--section) of --instruction-doc
(docs/benchmarks.md) between INSTRUCTION markers, keeping the text around them.

    python scripts/bench_quality.py --instruction                  # the shipped reference chat domain
    python scripts/train_instruct_teacher.py --out build/instruct  # man pages, docstrings, Debian descriptions
    python scripts/bench_quality.py --instruction --assets build/instruct --domain instruct --section instruct \
        --full-vocab --jobs 2

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
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
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


# --instruction: name: `kdcache train` options, on the chat cache from the CE-warmed-up student. The default grid
# (INSTRUCTION_GRID) is AdaKD's paper's: each base loss with and without AdaKD, its ablations on RKL, and CE alone.
INSTRUCTION_METHODS = {
    "CPT (CE on the references)": dict(loss="ce"),                        # no teacher: the baseline
    "FKL": dict(loss="fkl"),
    "FKL+AdaKD": dict(loss="fkl", adakd=True),
    "RKL": dict(loss="rkl"),
    "RKL+AdaKD": dict(loss="rkl", adakd=True),
    "RKL+AdaKD, LATF only": dict(loss="rkl", adakd=True, idts=False),      # ablations: which module moves it
    "RKL+AdaKD, IDTS only": dict(loss="rkl", adakd=True, latf=False),
    "JSD+AdaKD": dict(loss="jsd", adakd=True),
    "FKL+AdaKD, LATF only": dict(loss="fkl", adakd=True, idts=False),
    "FKL+AdaKD, IDTS only": dict(loss="fkl", adakd=True, latf=False),
    "RKL+AdaKD, IDTS only, c 0.2": dict(loss="rkl", adakd=True, latf=False, adakd_c=0.2),   # IDTS's band, narrowed
    "RKL+AdaKD, IDTS only, no τ²": dict(loss="rkl", adakd=True, latf=False, tau_squared=False),  # its weight, dropped
    "RKL+AdaKD, c 0.2": dict(loss="rkl", adakd=True, adakd_c=0.2),
    "RKL+AdaKD, no τ²": dict(loss="rkl", adakd=True, tau_squared=False),
}
INSTRUCTION_GRID = ("CPT (CE on the references)", "FKL", "FKL+AdaKD", "RKL", "RKL+AdaKD", "RKL+AdaKD, LATF only",
                    "RKL+AdaKD, IDTS only")
CHAT = "chat"


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


def train_run(name: str, student: Path, opts: dict, options: dict, cache: Path, work: Path, env: dict, reuse: bool,
              reused: list, key_parts: list, show_progress: bool = False) -> tuple[Path, float]:
    """`kdcache train` with opts (options: the method's own, for the log) into WORK/runs/<name>-s<seed>-<hash of
    opts, student and key_parts>; (the run, its seconds). With reuse, a finished run is kept (named in reused)."""
    key = hashlib.sha256(json.dumps([opts, str(student), *key_parts], sort_keys=True).encode()).hexdigest()[:8]
    run = work / "runs" / f"{slug(name)}-s{opts['seed']}-{key}"
    if reuse and (run / "final" / "config.json").exists() and (run / "done.json").exists():
        log(f"[train] {name} (seed {opts['seed']}): reusing {run}")
        reused.append(run.name)
        return run, json.loads((run / "done.json").read_text())["seconds"]
    shutil.rmtree(run, ignore_errors=True)
    run.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pipeline", "train", "--cache", str(cache), "--student", str(student), "--out",
           str(run), *option_args(opts)]
    log(f"[train] {name} (seed {opts['seed']}): kdcache train {' '.join(option_args(options))}")

    def progress(s):
        recs = read_metrics(run / "metrics.jsonl")
        if recs:
            r = recs[-1]
            w = " ".join(f"{d}={v:.2f}" for d, v in r.get("domain_weights", {}).items())
            log(f"  [{name}] step {r['step']}/{opts['steps']} loss {r['loss']:.3f} ({s:.0f}s) weights {w}")
    sec = run_logged(cmd, run.parent / f"{run.name}.log", env, progress=progress if show_progress else None)
    (run / "done.json").write_text(json.dumps({"seconds": sec, "cmd": cmd}))
    return run, sec


def command_line(doc_option: str) -> str:
    """This run's command without the options that do not change results (--reuse, the doc path)."""
    shown, skip = [], False
    for a in sys.argv[1:]:
        if skip or a in ("--reuse", doc_option):
            skip = a == doc_option
            continue
        if not a.startswith(doc_option + "="):
            shown.append(f"'{a}'" if any(c in a for c in " (){}\"") else a)
    return "python scripts/bench_quality.py " + " ".join(shown)


def choose_methods(p, args, base: dict, default=None) -> tuple[dict, list[str]]:
    """(base plus the --extra methods, the names chosen by --methods (default: `default`, else all, plus the
    --extra ones)); p.error on a bad name."""
    methods = dict(base)
    for spec in args.extra:
        cut = spec.find("={")
        if cut < 1:
            p.error(f"--extra {spec!r}: expected NAME={{json options}}")
        methods[spec[:cut]] = json.loads(spec[cut + 1:])
    chosen = [m.strip() for m in args.methods.split(";" if ";" in args.methods else ",")] if args.methods \
        else [*default, *(m for m in methods if m not in base)] if default else list(methods)
    if unknown := [m for m in chosen if m not in methods]:
        p.error(f"unknown method(s) {unknown}; known: {list(methods)}")
    return methods, chosen


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default=str(ROOT / "build" / "bench-quality"))
    p.add_argument("--quick", action="store_true", help="smoke run (~3 min): fewer steps, a small cache")
    p.add_argument("--steps", type=int, help="optimizer steps per method (default 1500; --quick 60)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seeds", help="comma-separated; every method runs once per seed (the table shows the mean "
                   "over seeds; default 0, --instruction 0,1,2)")
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
    p.add_argument("--instruction", action="store_true",
                   help="the instruction rows instead: FKL vs FKL/RKL/JSD + AdaKD on the chat domain (see above)")
    p.add_argument("--assets", default=str(ROOT / "pipeline" / "assets" / "reference"),
                   help="--instruction: teacher/, student/ and corpus/chat.jsonl")
    p.add_argument("--generate", type=int, default=100, help="--instruction: val conversations answered per eval")
    p.add_argument("--max-new-tokens", type=int, default=32, help="--instruction: tokens per generated reply")
    p.add_argument("--instruction-doc", default=str(ROOT / "docs" / "benchmarks.md"),
                   help="--instruction: the markdown file whose INSTRUCTION section is (re)written ('': none)")
    p.add_argument("--domain", default=CHAT, help="--instruction: the conversations, ASSETS/corpus/DOMAIN.jsonl")
    p.add_argument("--section", default="", help="--instruction: the doc section's tag (several sections can "
                   "live in one file; '' = the reference chat section)")
    p.add_argument("--full-vocab", action="store_true", help="--instruction: the grid also on a full-vocabulary "
                   "cache of the same teacher (codec v1, --top-k V)")
    p.add_argument("--temperature", type=float, default=1.0, help="--instruction: sampled replies' temperature")
    p.add_argument("--samples", type=int, default=5, help="--instruction: sampled replies per prompt (seeded)")
    p.add_argument("--jobs", type=int, default=1, help="--instruction: runs at a time (each --threads threads)")
    args = p.parse_args()
    if args.instruction:
        return instruction_main(p, args)
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
    methods, chosen = choose_methods(p, args, METHODS)
    skipped = {}
    for m in chosen:
        missing = sorted(set(methods[m]) - fields)
        if missing:
            skipped[m] = f"TrainConfig has no field {', '.join(missing)} yet"
            log(f"[note] skipping {m}: {skipped[m]}")
    chosen = [m for m in chosen if m not in skipped]
    seeds = [int(x) for x in (args.seeds or "0").split(",")]
    reused: list[str] = []
    common = dict(steps=steps, batch_size=args.batch_size, lr=args.lr, eval_rows=0, log_every=1, prefetch=1)

    def train(name: str, student: Path, options: dict, seed: int) -> tuple[Path, float]:
        return train_run(name, student, {**common, "seed": seed, **options}, options, cache, work, env, args.reuse,
                         reused, [manifest["tokenizer"], cache_bytes], show_progress=True)

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
    cmd_line = command_line("--doc")
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


def eval_generate(cache: Path, student: Path, env: dict, logfile: Path, n: int, max_new_tokens: int,
                  teacher: Path | None = None, temperature: float | None = None, samples: int = 1) -> dict:
    """`kdcache eval --json --generate n` on the val split (with `teacher`: its replies scored too); greedy, or
    sampled at `temperature` (`samples` seeded draws)."""
    cmd = [sys.executable, "-m", "pipeline", "eval", "--cache", str(cache), "--student", str(student), "--json",
           "--split", "val", "--generate", str(n), "--max-new-tokens", str(max_new_tokens)]
    if teacher is not None:
        cmd += ["--teacher", str(teacher)]
    if temperature is not None:
        cmd += ["--temperature", str(temperature), "--samples", str(samples)]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    logfile.write_text(r.stdout + r.stderr)
    if r.returncode:
        raise RuntimeError(f"eval failed: {' '.join(cmd)}\n{r.stderr[-2000:]}")
    return json.loads(r.stdout[r.stdout.index("{"):])


def adakd_trace(records: list[dict]) -> dict | None:
    """LATF's focus ratio along a run (at 0, 10, 25, 50, 75 and 100 % of its steps, and the first step at its
    floor) and IDTS's temperature range over the run, from metrics.jsonl; None for a run without AdaKD stats."""
    recs = [r for r in records if "focus_ratio" in r]
    if not recs:
        return None
    at = {f"{int(q * 100)}%": recs[min(len(recs) - 1, round(q * (len(recs) - 1)))]["focus_ratio"]
          for q in (0, 0.1, 0.25, 0.5, 0.75, 1.0)}
    low = min(r["focus_ratio"] for r in recs)
    return {"focus_ratio": at, "focus_min": low,
            "focus_min_step": next(r["step"] for r in recs if r["focus_ratio"] == low),
            "focus_mean": sum(r["focus_ratio"] for r in recs) / len(recs),
            "tau_min": min(r["tau_min"] for r in recs), "tau_max": max(r["tau_max"] for r in recs),
            "tau_mean": sum(r["tau_mean"] for r in recs) / len(recs),
            "tau_spread_last": recs[-1]["tau_max"] - recs[-1]["tau_min"],
            "kd_loss_first": recs[0]["kd_loss"], "kd_loss_last": recs[-1]["kd_loss"]}


def mean_sd(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof 1; 0 for one value)."""
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def mean_spread(values: list[float]) -> str:
    """"mean ± sd" over seeds."""
    return "{:.3f} ± {:.3f}".format(*mean_sd(values))


FULL = "full vocabulary"
TOP64 = "top-64"


def instruction_main(p: argparse.ArgumentParser, args) -> None:
    """--instruction: the domain's cache(s), a CE warm-up, the methods x seeds (x caches), eval --generate greedy
    and sampled, the doc section and its plot."""
    steps = args.steps or 400
    pretrain = args.pretrain_steps or 200
    seeds = [int(x) for x in (args.seeds or "0,1,2,3,4").split(",")]
    assets, domain = Path(args.assets), args.domain
    work = Path(args.work if args.work != p.get_default("work") else
                ROOT / "build" / f"bench-quality-instruction-{domain}")
    work.mkdir(parents=True, exist_ok=True)
    env = env_for(args.threads)
    py = sys.executable
    t_all = time.perf_counter()
    seconds = {}
    for need in ("teacher/config.json", "student/config.json", f"corpus/{domain}.jsonl"):
        if not (assets / need).exists():
            p.error(f"{assets / need}: missing (build the assets first; see --assets)")
    teacher = assets / "teacher"
    vocab = json.loads((teacher / "config.json").read_text())["vocab_size"]

    # 1. the cache(s): replies only, isolated packing (capture's defaults for conversations); with --full-vocab
    #    also the whole distribution (codec v1, --top-k V: no tail bucket, every loss exact at any temperature)
    caches = {TOP64: (work / "cache", ["--top-k", "64"])}
    if args.full_vocab:
        caches[FULL] = (work / "cache-full", ["--top-k", str(vocab), "--codec", "v1"])
    manifests = {}
    for name, (cache, opts) in caches.items():
        capture_cmd = [py, "-m", "pipeline", "capture", "--backend", "hf", "--teacher", str(teacher),
                       "--data", f"{domain}={assets / 'corpus' / f'{domain}.jsonl'}", *opts, "--seq-len", "128",
                       "--val-fraction", "0.1", "--dtype", "float32", "--out", str(cache)]
        if not (cache / "manifest.json").exists():
            log("[capture] " + " ".join(capture_cmd[1:]))
            seconds[f"capture {name}"] = run_logged(capture_cmd, work / f"capture-{slug(name)}.log", env,
                                                    progress=lambda s: log(f"  [capture] {s:.0f}s"), every=30)
        manifests[name] = json.loads((cache / "manifest.json").read_text())
    manifest = manifests[TOP64]
    info = {s: manifest["splits"][s][domain] for s in ("train", "val")}
    sup = {s: v["supervised_tokens"] for s, v in info.items()}
    cache_bytes = {name: sum(f.stat().st_size for f in c.rglob("*.parquet")) for name, (c, _) in caches.items()}
    log(f"[cache] rows {({s: v['rows'] for s, v in info.items()})}, tokens {({s: v['tokens'] for s, v in info.items()})}"
        f", supervised {sup}, bytes {cache_bytes}")

    # 2. runs
    methods, chosen = choose_methods(p, args, INSTRUCTION_METHODS, INSTRUCTION_GRID)
    common = dict(steps=steps, batch_size=args.batch_size, lr=args.lr, eval_rows=0, log_every=1, prefetch=1)
    reused = []

    def train(name: str, cache_name: str, student: Path, options: dict, seed: int) -> tuple[Path, float]:
        m = manifests[cache_name]
        return train_run(name, student, {**common, "seed": seed, **options}, options, caches[cache_name][0], work,
                         env, args.reuse, reused, [m["tokenizer"], m["splits"], m["codec"], m["top_k"]])

    (work / "evals").mkdir(exist_ok=True)
    run, seconds["warm-up"] = train("warmup", TOP64, assets / "student", dict(loss="ce", steps=pretrain), 0)
    student = run / "final"
    decode = dict(temperature=args.temperature, samples=args.samples)
    gen = lambda cache, model, logfile, **kw: eval_generate(cache, model, env, logfile, args.generate,  # noqa: E731
                                                            args.max_new_tokens, **kw)
    base = {"greedy": gen(work / "cache", student, work / "evals" / "warmup.log", teacher=teacher),
            "sampled": gen(work / "cache", student, work / "evals" / "warmup-sampled.log", teacher=teacher, **decode)}
    rouge = lambda rep, who="student": rep["generate"][who]["domains"][domain]["rouge_l"]  # noqa: E731
    start = {"ce": base["greedy"]["domains"][domain]["student_ce"], "kl": base["greedy"]["domains"][domain]["kl"],
             "rouge": rouge(base["greedy"]), "sampled": rouge(base["sampled"])}
    ceiling = {"ce": base["greedy"]["domains"][domain]["teacher_ce"], "rouge": rouge(base["greedy"], "teacher"),
               "sampled": rouge(base["sampled"], "teacher"),
               "sampled_sd": base["sampled"]["generate"]["teacher"]["domains"][domain]["rouge_l_std"]}
    log(f"[warm-up] {pretrain} CE steps: reply CE {start['ce']:.3f}, ROUGE-L greedy {start['rouge']:.3f} sampled "
        f"{start['sampled']:.3f}; teacher reply CE {ceiling['ce']:.3f}, ROUGE-L greedy {ceiling['rouge']:.3f} "
        f"sampled {ceiling['sampled']:.3f}")

    # every (cache, method, seed), --jobs at a time; CE ignores the teacher, so CPT runs on the top-64 cache only
    jobs = [(c, name, seed) for c in caches for name in chosen for seed in seeds
            if c == TOP64 or methods[name].get("loss") != "ce"]
    results = {}                   # (cache, name): {"ce": [per seed], "rouge", "sampled", "kl", "seconds", "adakd"}

    def one(job):
        cache_name, name, seed = job
        run, sec = train(name, cache_name, student, methods[name], seed)
        cache = caches[cache_name][0]
        greedy = gen(cache, run / "final", run.parent / f"{run.name}.eval.log")
        sampled = gen(cache, run / "final", run.parent / f"{run.name}.eval-sampled.log", **decode)
        return job, sec, greedy, sampled, adakd_trace(read_metrics(run / "metrics.jsonl"))

    with ThreadPoolExecutor(args.jobs) as pool:
        for (cache_name, name, seed), sec, greedy, sampled, trace in pool.map(one, jobs):
            r = results.setdefault((cache_name, name), {k: [] for k in ("ce", "kl", "rouge", "sampled", "seconds",
                                                                          "adakd")})
            r["ce"].append(greedy["domains"][domain]["student_ce"])
            r["kl"].append(greedy["domains"][domain]["kl"])
            r["rouge"].append(rouge(greedy))
            r["sampled"].append(rouge(sampled))
            r["seconds"].append(round(sec, 1))
            if trace is not None:
                r["adakd"].append(trace)
            log(f"  [{cache_name}: {name}] seed {seed}: reply CE {r['ce'][-1]:.4f}, ROUGE-L greedy {r['rouge'][-1]:.3f}"
                f" sampled {r['sampled'][-1]:.3f}, {sec:.0f}s ({time.perf_counter() - t_all:.0f}s total)")
    t_total = time.perf_counter() - t_all

    # 3. tables, plot
    n_gen = base["greedy"]["generate"]["student"]["domains"][domain]["n"]
    table_lines = [f"| cache | method | reply CE (nats) | KL(teacher‖student) | ROUGE-L greedy | ROUGE-L sampled "
                   f"(T {args.temperature:g}, {args.samples} draws) | seconds per run |", "|---|---|---|---|---|---|---|",
                   f"| | student after the CE warm-up | {start['ce']:.3f} | {start['kl']:.3f} | {start['rouge']:.3f} | "
                   f"{start['sampled']:.3f} | |"]
    for (cache_name, name), r in results.items():
        table_lines.append(f"| {cache_name} | {name} | {mean_spread(r['ce'])} | {mean_spread(r['kl'])} | "
                           f"{mean_spread(r['rouge'])} | {mean_spread(r['sampled'])} | "
                           f"{sum(r['seconds']) / len(r['seconds']):.0f} |")
    table_lines.append(f"| | teacher (ceiling) | {ceiling['ce']:.3f} | 0 | {ceiling['rouge']:.3f} | "
                       f"{ceiling['sampled']:.3f} ± {ceiling['sampled_sd']:.3f} (over draws) | |")
    paired_lines = ["| cache | method − its base | Δ reply CE | Δ ROUGE-L greedy | Δ ROUGE-L sampled |", "|---|---|---|---|---|"]
    for (cache_name, name), r in results.items():
        base_name = next((b for b in ("FKL", "RKL") if name.startswith(b + "+")), None)
        if base_name and (cache_name, base_name) in results and len(r["ce"]) == len(results[cache_name, base_name]["ce"]):
            b = results[cache_name, base_name]
            delta = lambda k: mean_spread([x - y for x, y in zip(r[k], b[k])])  # noqa: E731
            paired_lines.append(f"| {cache_name} | {name} − {base_name} | {delta('ce')} | {delta('rouge')} | "
                                f"{delta('sampled')} |")
    trace_lines = ["| cache | method | focus ratio at 0 / 10 / 25 / 50 / 75 / 100 % of the steps | mean ratio | "
                   "τ min–max over the run | mean τ | KD loss first → last |", "|---|---|---|---|---|---|---|"]
    for (cache_name, name), r in results.items():
        if not (tr := r["adakd"]):
            continue
        avg = lambda key: sum(t[key] for t in tr) / len(tr)   # noqa: E731
        ratios = " / ".join(f"{sum(t['focus_ratio'][q] for t in tr) / len(tr):.2f}" for q in tr[0]["focus_ratio"])
        trace_lines.append(f"| {cache_name} | {name} | {ratios} | {avg('focus_mean'):.2f} | "
                           f"{min(t['tau_min'] for t in tr):.2f}–{max(t['tau_max'] for t in tr):.2f} | "
                           f"{avg('tau_mean'):.3f} | {avg('kd_loss_first'):.3f} → {avg('kd_loss_last'):.3f} |")
    import torch
    machine = (f"{platform.machine()} CPU, {os.cpu_count()} cores (shared), torch {torch.__version__}, "
               f"{args.threads or torch.get_num_threads()} torch thread(s) per process, {args.jobs} run(s) at a time")
    cmd_line = command_line("--instruction-doc")
    log(f"\n{domain} domain, val split ({sup['val']:,} reply tokens; ROUGE-L over {n_gen} conversations), "
        f"{steps} steps x batch {args.batch_size}, lr {args.lr}, seeds {seeds} (mean ± sd over seeds):")
    for line in table_lines + [""] + paired_lines + [""] + trace_lines:
        log(line)
    result = {"domain": domain, "assets": str(assets), "steps": steps, "pretrain_steps": pretrain,
              "batch_size": args.batch_size, "lr": args.lr, "seeds": seeds, "generate": n_gen,
              "max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "samples": args.samples,
              "cache": info, "supervised_tokens": sup, "cache_bytes": cache_bytes, "start": start, "teacher": ceiling,
              "methods": {f"{c}: {n}": r for (c, n), r in results.items()},
              "seconds": {k: round(v, 1) for k, v in seconds.items()}, "total_seconds": round(t_total, 1),
              "reused_runs": len(reused), "machine": machine}
    (work / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    if args.instruction_doc:
        doc = Path(args.instruction_doc)
        png = doc.parent / f"instruction_{slug(args.section or domain)}.png"
        plot_rouge(results, start, ceiling, png, f"{domain}: val ROUGE-L by method (mean ± sd over {len(seeds)} "
                                                   f"seeds)", args.temperature, args.samples)
        write_instruction_doc(doc, args.section, cmd_line, machine, result, table_lines, paired_lines,
                              trace_lines, png.name)
        log(f"\nwrote the INSTRUCTION section of {args.instruction_doc} and {png}")
    print(json.dumps({k: v for k, v in result.items() if k != "methods"} |
                     {"methods": {f"{c}: {n}": {k: r[k] for k in ("ce", "rouge", "sampled")}
                                  for (c, n), r in results.items()}}))


def plot_rouge(results: dict, start: dict, ceiling: dict, path: Path, title: str, temperature: float,
               samples: int) -> None:
    """Bars of greedy and sampled ROUGE-L per (cache, method) with the sd over seeds; warm-up and teacher lines."""
    from trainer.plots import plt, save_figure
    names = [f"{n}\n({c})" for c, n in results]
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 1.1 * len(names)), 4.8), sharey=False)
    for ax, key, label in ((axes[0], "rouge", "greedy"), (axes[1], "sampled", f"sampled (T {temperature:g}, "
                                                                              f"{samples} draws)")):
        ms = [mean_sd(r[key]) for r in results.values()]
        colors = ["#4c72b0" if c == TOP64 else "#dd8452" for c, _ in results]
        ax.bar(range(len(ms)), [m for m, _ in ms], yerr=[s for _, s in ms], color=colors, capsize=3)
        ax.axhline(start[key], color="grey", ls=":", label="student after CE warm-up")
        ax.axhline(ceiling[key], color="green", ls="--", label="teacher")
        lo = min(min(m - s for m, s in ms), start[key]) - 0.01
        ax.set_ylim(max(0, lo), max(max(m + s for m, s in ms), ceiling[key]) + 0.01)
        ax.set_xticks(range(len(ms)), names, rotation=60, ha="right", fontsize=7)
        ax.set(title=f"ROUGE-L, {label}", ylabel="val ROUGE-L F1")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title + " — blue: top-64 cache, orange: full-vocabulary cache", fontsize=9)
    save_figure(fig, path)


def instruction_markers(section: str) -> tuple[str, str]:
    tag = f" {section}" if section else ""
    return (f"<!-- INSTRUCTION{tag}: generated by scripts/bench_quality.py --instruction -->",
            f"<!-- /INSTRUCTION{tag} -->")


def write_instruction_doc(path: Path, section: str, cmd: str, machine: str, result: dict, table_lines,
                          paired_lines, trace_lines, png: str) -> None:
    """(Re)write the generated block between the section's INSTRUCTION markers of `path`; the text around it (the
    heading and the hand-written analysis) is kept. Without the markers, a new section is appended."""
    begin, end = instruction_markers(section)
    c, sup = result["cache"], result["supervised_tokens"]
    block = [
        begin,
        f"Command: `{cmd}`  ",
        f"Machine: {machine}.  ",
        f"Cache: `{result['domain']}` of {result['assets']} (HF capture, seq 128, val fraction 0.1, isolated "
        f"packing, replies only): train {c['train']['rows']} rows / {c['train']['tokens']:,} tokens of which "
        f"{sup['train']:,} reply tokens; val {c['val']['rows']} rows / {c['val']['tokens']:,} tokens, "
        f"{sup['val']:,} reply tokens. Bytes on disk: "
        + ", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in result["cache_bytes"].items()) + ".  ",
        f"Student: the assets' student after {result['pretrain_steps']} CE steps on this cache (batch "
        f"{result['batch_size']}, lr {result['lr']}); then each method {result['steps']} steps × "
        f"{result['batch_size']} rows × 128 tokens, lr {result['lr']}, seeds {result['seeds']}, every other option "
        f"at its default (AdaKD: LATF + IDTS, c = 0.5, β = 0.99, ε = δ = 0.05, floor 0.1, 5 % warm-up). "
        "Seconds: " + ", ".join(f"{k} {v:.0f} s" for k, v in result["seconds"].items())
        + f"; total {result['total_seconds']:.0f} s"
        + (f" ({result['reused_runs']} runs reused)" if result["reused_runs"] else "") + ".",
        "",
        f"Val split: reply-only CE and KL (`kdcache eval`), ROUGE-L F1 of replies to the last user turn of "
        f"{result['generate']} conversations (`kdcache eval --generate {result['generate']} --max-new-tokens "
        f"{result['max_new_tokens']}`, greedy, and `--temperature {result['temperature']:g} --samples "
        f"{result['samples']}`: the mean over the draws); mean ± sd over the seeds:", "",
        *table_lines, "",
        "Paired by seed (the same seed's data order and init), AdaKD and its modules minus their base loss; "
        "mean ± sd over seeds:", "",
        *paired_lines, "",
        "AdaKD's state along the runs (metrics.jsonl; mean over seeds):", "",
        *trace_lines, "",
        f"![ROUGE-L by method]({png})", "",
        end,
    ]
    text = path.read_text() if path.exists() else ""
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + "\n".join(block) + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + f"\n\n## Instruction distillation: {section or result['domain']} " \
            "(`scripts/bench_quality.py --instruction`)\n\n" + "\n".join(block) + "\n"
    path.write_text(text)


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
