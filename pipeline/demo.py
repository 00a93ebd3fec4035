"""kdcache demo: the whole pipeline on the shipped reference corpus, teacher and student (no downloads).

    capture (vLLM) -> inspect + verify -> student warm-up (CE) -> profile -> train CPT, KD and DDK+AdaKD for the
    same steps -> eval -> greedy replies on the chat domain (ROUGE-L) -> DIR/report.md and PNG plots

Four domains are text; `chat` holds instruction conversations, rendered with the teacher's chat template and
distilled on the replies only, so every document sits alone in its rows (isolated packing) and the chat
perplexity is over reply tokens. The warmed-up student, each method and the teacher (the ceiling) then answer the
last user turn of `GENERATE_N` val conversations greedily (trainer.generate), scored with ROUGE-L F1.

The assets in pipeline/assets/reference/ come from scripts/train_reference_teacher.py (see its README.md). The
student is first trained briefly with plain CE (`warmup_steps`), because DDK and AdaKD distil pretrained students;
every method then starts from that same student with the same steps, batch, lr and seed. Re-running continues:
a finished stage is kept (the capture resumes shard by shard, a finished training run is not redone).
"""

import json
import logging
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path

import click
import torch

from cache_format import KdcacheError, open_cache, read_manifest, verify_cache
from trainer.config import TrainConfig
from trainer.generate import generation_report, last_replies
from trainer.profile import ProfileConfig, format_profile_table, run_profile
from trainer.run_dir import latest_checkpoint, read_metrics
from trainer.student import load_student
from trainer.train import run_train

from .capture import run_capture
from .config import CaptureConfig
from .corpus import DataSpec
from .options import option_args

log = logging.getLogger("kdcache")

ASSETS = Path(__file__).resolve().parent / "assets" / "reference"
DOMAINS = ("code", "data", "prose", "arith", "chat")
CHAT = "chat"                        # the domain of conversations: its replies are generated and scored
GENERATE_N = 50                      # val conversations whose last reply each model generates
GENERATE_TOKENS = 32                 # new tokens per reply at most (the references are under 20)

# name: `kdcache train` options of each compared method (everything else is shared)
METHODS = {
    "CPT": dict(loss="ce"),
    "KD": dict(loss="fkl"),
    "DDK+AdaKD": dict(loss="fkl", sampling="ddk", ce_weight=0.0, kd_weight=1.0, adakd=True),
}


@dataclass(frozen=True)
class DemoConfig:
    out: str = "demo-out"
    backend: str | None = "vllm"         # None: vLLM when it can run, else HF
    steps: int = 600                     # optimizer steps per compared method
    warmup_steps: int = 200              # CE steps that make the shipped random-init student a "pretrained" one
    batch_size: int = 8
    lr: float = 3e-3
    max_tokens_per_domain: int | None = 120_000
    seed: int = 0
    threads: int = 1                     # torch threads for the student stages (0: torch's default)

    def __post_init__(self):
        if self.threads < 0:
            raise KdcacheError(f"--threads {self.threads}: must be >= 0")
        for name in ("steps", "warmup_steps", "batch_size"):
            if getattr(self, name) < 1:
                raise KdcacheError(f"--{name.replace('_', '-')} {getattr(self, name)}: must be >= 1")


def run_demo(cfg: DemoConfig) -> Path:
    """Run every stage into cfg.out and write cfg.out/report.md; returns the report's path."""
    threads = torch.get_num_threads()
    try:
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        return _run_stages(cfg)
    finally:
        torch.set_num_threads(threads)


def _run_stages(cfg: DemoConfig) -> Path:
    root = Path(cfg.out)
    root.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    n_stages = 7

    def stage(i: int, msg: str) -> None:
        click.echo(click.style(f"==> [{i}/{n_stages}] {msg}", bold=True), err=True)

    def timed(name: str, fn):
        t0 = time.perf_counter()
        result = fn()
        seconds[name] = round(time.perf_counter() - t0, 1)
        return result

    # 1. capture
    cache = root / "cache"
    stage(1, f"capture: reference teacher over {len(DOMAINS)} domains ({cfg.backend or 'auto'} engine) -> {cache}")
    capture_cfg = CaptureConfig(
        teacher=str(ASSETS / "teacher"), out=str(cache), backend=cfg.backend, top_k=64, seq_len=128,
        data=tuple(DataSpec(d, str(ASSETS / "corpus" / f"{d}.jsonl")) for d in DOMAINS), val_fraction=0.05,
        max_tokens_per_domain=cfg.max_tokens_per_domain, shard_size_mb=16.0, gpu_memory_utilization=0.25,
        dtype="float32")              # the teacher's own dtype; vLLM's CPU default (bf16) is slow without AVX-512
    stats, stats_path = {}, root / "capture_stats.json"
    timed("capture", lambda: run_capture(capture_cfg, stats))
    if stats:                                                    # kept for re-runs, which capture nothing
        stats_path.write_text(json.dumps(stats))
    stats = json.loads(stats_path.read_text()) if stats_path.exists() else {}

    # 2. inspect + verify
    stage(2, "inspect + verify")
    summary = read_manifest(cache).summary()
    checked = timed("verify", lambda: verify_cache(cache))
    click.echo(f"   {checked.shards} shards, {checked.tokens:,} tokens, {summary['total']['bytes_per_token']} "
               f"bytes/token; every checksum OK", err=True)

    # 3. student warm-up: plain CE, natural mix
    base = dict(cache=str(cache), steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr, seed=cfg.seed,
                eval_rows=10**6, log_every=1)
    warm = root / "runs" / "student-warmup"
    stage(3, f"student warm-up: {cfg.warmup_steps} steps of CE from the shipped random-init student -> {warm}")
    timed("warm-up", lambda: _train(TrainConfig(**{**base, "steps": cfg.warmup_steps}, student=str(ASSETS / "student"),
                                                out=str(warm), loss="ce")))
    student = warm / "final"

    # 4. profile
    stage(4, f"profile: the warmed-up student against the teacher on the val split -> {root / 'profile.json'}")
    profile = timed("profile", lambda: run_profile(ProfileConfig(cache=str(cache), student=str(student),
                                                                       out=str(root / "profile.json"))))
    click.echo(format_profile_table(profile), err=True)

    # 5. train each method for the same steps
    evals = {}
    for i, (name, options) in enumerate(METHODS.items(), 1):
        run = root / "runs" / _slug(name)
        stage(5, f"train {name} ({i}/{len(METHODS)}): {cfg.steps} steps, {' '.join(option_args(options))} -> {run}")
        evals[name] = timed(name, lambda: _train(TrainConfig(**base, **options, student=str(student), out=str(run))))

    # 6. greedy replies on the chat domain, ROUGE-L against the references
    models = {"student before (warm-up)": student, **{n: root / "runs" / _slug(n) / "final" for n in METHODS},
              "teacher": ASSETS / "teacher"}
    stage(6, f"generate: greedy replies to {GENERATE_N} {CHAT} val conversations (<= {GENERATE_TOKENS} tokens) "
             f"by {len(models)} models, ROUGE-L")
    rouge = timed("generate", lambda: _generate(cache, models))
    (root / "generate.json").write_text(json.dumps(rouge, indent=2) + "\n")

    # 7. report + plots
    stage(7, f"report -> {root / 'report.md'}")
    ddk_run = root / "runs" / _slug("DDK+AdaKD")
    for png in ("domain_weights.png", "domain_loss.png", "adakd.png"):
        shutil.copyfile(ddk_run / png, root / png)
    _plot_val_ppl(profile, evals, root / "val_ppl.png")
    report = _report(cfg, summary, checked.bytes, stats, seconds, profile, evals,
                     read_metrics(ddk_run / "metrics.jsonl"), rouge)
    (root / "report.md").write_text(report)
    click.echo(f"val perplexity ({CHAT}: reply tokens only):\n" + _ppl_table(profile, evals), err=True)
    click.echo(_rouge_table(rouge), err=True)
    return root / "report.md"


def _generate(cache: Path, models: dict[str, Path]) -> dict:
    """{model name: generation_report on the chat domain's val split} (one model in memory at a time); the
    examples' prompts keep their special tokens (the turns)."""
    opened = open_cache(cache)                                   # its text domains have no reply: left out
    out = {}
    for name, path in models.items():
        model, tokenizer = load_student(str(path), opened)
        out[name] = generation_report(opened, model, tokenizer, "val", GENERATE_N, GENERATE_TOKENS,
                                      batch_size=16)["domains"][CHAT]
        pairs = last_replies(opened, "val", CHAT, len(out[name]["examples"]))
        for example, (prompt, _) in zip(out[name]["examples"], pairs):
            example["prompt"] = tokenizer.decode(prompt)
        click.echo(f"   {name}: ROUGE-L {out[name]['rouge_l']:.3f} over {out[name]['n']} replies", err=True)
        del model
    return out


def _rouge_table(rouge: dict) -> str:
    lines = [f"| model | ROUGE-L ({CHAT} val, greedy) |", "|---|---|"]
    return "\n".join(lines + [f"| {name} | {r['rouge_l']:.3f} |" for name, r in rouge.items()])


def _train(cfg) -> dict:
    """run_train, kept when finished (eval.json there), resumed when a checkpoint exists, else started anew."""
    run = Path(cfg.out)
    if (run / "eval.json").exists():
        log.info("%s is finished: kept", run)
        return json.loads((run / "eval.json").read_text())
    if run.exists() and latest_checkpoint(run) is not None:
        return run_train(replace(cfg, resume=True, save_every=50))
    shutil.rmtree(run, ignore_errors=True)                      # a run killed before its first checkpoint
    return run_train(replace(cfg, save_every=50))


def _slug(name: str) -> str:
    return name.lower().replace("+", "-")


def _ppl_rows(profile: dict, evals: dict) -> list[tuple[str, dict]]:
    """(row name, {domain: val perplexity}) for the teacher, the starting student and every method."""
    rows = [("teacher", {d: v["teacher_ppl"] for d, v in profile["domains"].items()}),
            ("student before (warm-up)", {d: v["student_ppl"] for d, v in profile["domains"].items()})]
    return rows + [(name, {d: v["ppl"] for d, v in e["domains"].items()}) for name, e in evals.items()]


def _ppl_table(profile: dict, evals: dict) -> str:
    domains = list(profile["domains"])
    lines = ["| model | " + " | ".join(f"{d} (replies)" if d == CHAT else d for d in domains) + " | average |",
             "|---" * (len(domains) + 2) + "|"]
    for name, ppl in _ppl_rows(profile, evals):
        avg = sum(ppl[d] for d in domains) / len(domains)
        lines.append(f"| {name} | " + " | ".join(f"{ppl[d]:.3f}" for d in domains) + f" | **{avg:.3f}** |")
    return "\n".join(lines)


def _plot_val_ppl(profile: dict, evals: dict, path: Path) -> None:
    """Grouped bars: per-domain val perplexity of the starting student, each method and the teacher."""
    from trainer.plots import plt, save_figure

    rows = _ppl_rows(profile, evals)
    domains = list(profile["domains"])
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.8 / len(rows)
    for i, (name, ppl) in enumerate(rows):
        ax.bar([j + i * width for j in range(len(domains))], [ppl[d] for d in domains], width, label=name)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(domains))], domains)
    ax.set(ylabel="val perplexity (lower is better)", title="per-domain validation perplexity")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1, 1))
    save_figure(fig, path)


def _report(cfg: DemoConfig, summary: dict, nbytes: int, capture: dict, seconds: dict, profile: dict,
            evals: dict, ddk_records: list[dict], rouge: dict) -> str:
    teacher = summary["teacher"]
    total = summary["total"]
    domains = list(profile["domains"])
    capture_line = (f"**{capture['tokens'] / capture['seconds']:,.0f} tokens/s** end to end (tokenisation, teacher "
                    f"forward + top-k, Parquet writing, checksums: {capture['tokens']:,} tokens in "
                    f"{capture['seconds']:.1f} s) after an engine start of {capture['engine_start_s']:.1f} s"
                    if capture.get("seconds") else "not measured (the cache was complete before the demo ran)")
    lines = [
        "# kdcache demo report", "",
        "What ran (the same as these commands; `ASSETS` = `pipeline/assets/reference`):", "",
        "```",
        f"kdcache capture --teacher ASSETS/teacher --backend {teacher['engine']} --top-k 64 --seq-len 128 "
        f"--dtype float32 --val-fraction 0.05 --max-tokens-per-domain {cfg.max_tokens_per_domain} "
        + " ".join(f"--data {d}=ASSETS/corpus/{d}.jsonl" for d in DOMAINS) + f" --out {cfg.out}/cache",
        f"kdcache inspect {cfg.out}/cache && kdcache verify {cfg.out}/cache",
        f"kdcache train --cache {cfg.out}/cache --student ASSETS/student --loss ce --steps {cfg.warmup_steps} "
        f"--out {cfg.out}/runs/student-warmup",
        f"kdcache profile --cache {cfg.out}/cache --student {cfg.out}/runs/student-warmup/final "
        f"--out {cfg.out}/profile.json",
        *(f"kdcache train --cache {cfg.out}/cache --student {cfg.out}/runs/student-warmup/final "
          f"{' '.join(option_args(o))} --steps {cfg.steps} --batch-size {cfg.batch_size} --lr {cfg.lr} "
          f"--out {cfg.out}/runs/{_slug(n)}" for n, o in METHODS.items()),
        "```", "",
        "## The cache", "",
        f"- teacher: the shipped reference Llama (`ASSETS/teacher`, 1.3M params), engine {teacher['engine']} "
        f"{teacher['engine_version']}, {teacher['dtype']}",
        f"- top-k {summary['top_k']}, seq_len {summary['seq_len']}, codec `{summary['codec']['name']}`, "
        f"{total['rows']:,} rows",
        f"- size: {nbytes / 2**20:.1f} MiB on disk, **{total['bytes_per_token']} bytes/token**; verify: every "
        f"shard's checksum OK",
        f"- capture speed: {capture_line}", "",
        "| split | domain | rows | tokens | bytes/token |", "|---|---|---|---|---|",
        *(f"| {split} | {d} | {v['rows']} | {v['tokens']:,} | {v['bytes_per_token']} |"
          for split, ds in summary["splits"].items() for d, v in ds.items()), "",
        "## The student-teacher gap before distillation (`kdcache profile`)", "",
        "| domain | val tokens | student ppl | teacher ppl | ratio | KL | DDK weight |", "|---|---|---|---|---|---|---|",
        *(f"| {d} | {v['tokens']:,} | {v['student_ppl']:.3f} | {v['teacher_ppl']:.3f} | {v['ratio']:.3f} | "
          f"{v['kl']:.4f} | {v['weight']:.3f} |" for d, v in profile["domains"].items()), "",
        f"## Per-domain validation perplexity after {cfg.steps} steps", "",
        f"Every method starts from the warmed-up student and trains {cfg.steps} steps × {cfg.batch_size} rows × "
        f"{summary['seq_len']} tokens, lr {cfg.lr}, seed {cfg.seed}; the whole val split is evaluated. "
        "CPT = plain CE on the corpus; KD = forward KL to the cached teacher, natural domain mix; "
        "DDK+AdaKD = the same loss with DDK's domain sampling and AdaKD's token focusing and temperatures. "
        f"The `{CHAT}` column is the perplexity of the reply tokens only (the conversations' prompts are not "
        "trained on nor scored); the average counts each domain once.", "",
        _ppl_table(profile, evals), "",
        "![per-domain val perplexity](val_ppl.png)", "",
        f"## Instruction following: greedy replies on `{CHAT}`", "",
        f"Each model answers the last user turn of the first {next(iter(rouge.values()))['n']} `{CHAT}` val "
        f"conversations (the prompt: the conversation up to that reply), greedily, at most {GENERATE_TOKENS} new "
        "tokens, stopping at the end-of-turn token; ROUGE-L F1 against the reference reply "
        "(`kdcache eval --generate`'s measure; the teacher is the ceiling):", "",
        _rouge_table(rouge), "",
        "| prompt (its end) | reference | " + " | ".join(rouge) + " |", "|---" * (len(rouge) + 2) + "|",
        *(f"| `{_cell(ex['prompt'])}` | {_cell(ex['reference'])} | "
          + " | ".join(_cell(r['examples'][i]['reply']) for r in rouge.values()) + " |"
          for i, ex in enumerate(next(iter(rouge.values()))["examples"])), "",
        "## DDK's domain weights (DDK+AdaKD run)", "",
        "The sampling mix follows the student-teacher gap, re-measured on val rows and smoothed (Eq. 2):", "",
        "| step | " + " | ".join(domains) + " |", "|---" * (len(domains) + 1) + "|",
    ]
    for r in _milestones(ddk_records, 6):
        lines.append(f"| {r['step']} | " + " | ".join(f"{r['domain_weights'][d]:.3f}" for d in domains) + " |")
    last = ddk_records[-1]
    lines += [
        "", "![domain weights](domain_weights.png)", "", "![per-domain training loss](domain_loss.png)", "",
        "## AdaKD", "",
        f"LATF distilled {last['focus_ratio']:.0%} of the tokens at the last step (the hardest by Hellinger distance); "
        f"IDTS temperatures there ranged {last['tau_min']:.2f}-{last['tau_max']:.2f} (mean {last['tau_mean']:.2f}).", "",
        "![AdaKD focus and temperatures](adakd.png)", "",
        "## Time", "",
        "| stage | seconds |", "|---|---|", *(f"| {k} | {v} |" for k, v in seconds.items()),
        "", f"Full runs (metrics.jsonl, TensorBoard logs, checkpoints, final students): `{cfg.out}/runs/`.", "",
    ]
    return "\n".join(lines)


def _cell(text: str, tail: int = 60) -> str:
    """A markdown table cell: one line, pipes escaped, at most the last `tail` characters."""
    text = " ".join(text.split()).replace("|", "\\|")
    return text if len(text) <= tail else "…" + text[-tail:]


def _milestones(records: list[dict], n: int) -> list[dict]:
    """n records spread evenly over the run, first and last included."""
    picks = sorted({round(i * (len(records) - 1) / (n - 1)) for i in range(n)})
    return [records[i] for i in picks]
