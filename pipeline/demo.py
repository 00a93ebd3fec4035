"""kdcache demo: the pipeline on a built-in toy corpus with tiny local models (no downloads).

Today it runs capture (vLLM when it can run, else HF) -> inspect -> verify and writes DIR/report.md; profile,
train and eval join as their stages land. The teacher is a random-weight tiny Llama until the reference teacher
ships, so the numbers show the machinery, not distillation quality.
"""

import logging
import time
from pathlib import Path

import click

from cache_format import verify_cache

from .capture import CaptureConfig, run_capture
from .toy import WORDS, build_llama, build_tokenizer, write_toy_corpus

log = logging.getLogger("kdcache")


def run_demo(out: str) -> Path:
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    step = lambda msg: click.echo(click.style(f"==> {msg}", bold=True), err=True)  # noqa: E731

    step(f"corpus: {len(WORDS)} toy domains -> {root / 'corpus'}")
    specs = write_toy_corpus(root / "corpus", 400, seed=0)

    teacher = root / "models" / "teacher"
    if not (teacher / "config.json").exists():
        step(f"teacher: tiny random Llama (2 layers, d=128) + BPE tokenizer -> {teacher}")
        tok = build_tokenizer(teacher)
        build_llama(teacher, len(tok), hidden=128, layers=2, seed=0, eos_id=tok.eos_token_id)

    cache = root / "cache"
    step(f"capture -> {cache}")
    t0 = time.perf_counter()
    run_capture(CaptureConfig(teacher=str(teacher), data=tuple(specs), out=str(cache), top_k=64, seq_len=128,
                              val_fraction=0.05, shard_size_mb=1.0))
    capture_s = time.perf_counter() - t0

    step("verify")
    report = verify_cache(cache)
    from .cli import cache_summary
    summary = cache_summary(str(cache))
    click.echo(f"OK: {report.shards} shards, {report.rows} rows, {report.tokens} tokens, "
               f"{summary['total']['bytes_per_token']} bytes/token", err=True)

    lines = [
        "# kdcache demo report", "",
        f"- teacher: `{teacher}` ({summary['teacher']['engine']} {summary['teacher']['engine_version']}, "
        f"{summary['teacher']['dtype']}), a random-weight tiny Llama: the machinery, not distillation quality",
        f"- cache: `{cache}`, top_k {summary['top_k']}, seq_len {summary['seq_len']}, codec {summary['codec']['name']}",
        f"- capture wall time {capture_s:.1f}s including engine start; {report.tokens} tokens",
        f"- size: {report.bytes} bytes, {summary['total']['bytes_per_token']} bytes/token; verify: OK", "",
        "| split | domain | rows | tokens | bytes/token |", "|---|---|---|---|---|",
    ]
    for split, domains in summary["splits"].items():
        lines += [f"| {split} | {d} | {v['rows']} | {v['tokens']} | {v['bytes_per_token']} |" for d, v in domains.items()]
    lines += ["", "Next stages (profile, train, eval) join this demo as they land."]
    (root / "report.md").write_text("\n".join(lines) + "\n")
    step(f"report -> {root / 'report.md'}")
    return root
