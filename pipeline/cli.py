"""The `kdcache` command group. Commands only parse options and call a run_* function."""

import json
import logging
import os
import sys

import click

from cache_format import KdcacheError, open_cache, verify_cache

from . import __version__


class KdcacheGroup(click.Group):
    """Turns every failure into one `Error: ...` line and exit code 1 (a traceback only with --debug)."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except Exception as e:
            if ctx.meta.get("kdcache.debug") or os.environ.get("KDCACHE_DEBUG"):
                raise
            msg = str(e) if isinstance(e, KdcacheError) else f"{type(e).__name__}: {e} (--debug shows the traceback)"
            click.echo(f"Error: {msg}", err=True)
            ctx.exit(1)


@click.group(cls=KdcacheGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="kdcache")
@click.option("--debug", is_flag=True, help="Show full tracebacks instead of one-line errors, and debug log lines.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """kdcache: offline knowledge distillation for LLMs.

    capture the teacher's top-k once, then profile and train any number of students from the cache.
    """
    ctx.meta["kdcache.debug"] = debug
    logging.basicConfig(level=logging.INFO, format="kdcache: %(message)s", stream=sys.stderr)
    if debug:                                   # kdcache's own debug lines (e.g. the rows each rank trains on)
        logging.getLogger("kdcache").setLevel(logging.DEBUG)


@cli.command()
@click.option("--teacher", help="HF model directory of the teacher.")
@click.option("--data", "data", multiple=True, metavar="DOMAIN=PATH",
              help="Domain-tagged corpus: a file, directory or glob of .jsonl/.json/.parquet/.txt (also .jsonl.zst, "
                   ".jsonl.gz, a datasets save_to_disk dir). Repeatable.")
@click.option("--out", help="Cache directory or URL (s3://, gs://) to write (re-running the same command resumes).")
@click.option("--backend", type=click.Choice(["vllm", "hf"]), default=None, help="Default: vllm if it can run, else hf.")
@click.option("--top-k", type=int, default=64, show_default=True, help="Entries per position (v2: the cap).")
@click.option("--codec", type=click.Choice(["v2", "v1"]), default="v2", show_default=True,
              help="v2: quantised log-probs, adaptive k; v1: plain int32 ids + float32 log-probs.")
@click.option("--top-p", type=float, default=None, help="v2: keep the smallest prefix with this probability mass.")
@click.option("--kl-budget", type=float, default=None,
              help="v2: keep the fewest entries whose extra KL vs --top-k entries is <= this (nats per position).")
@click.option("--kl-scale", type=float, default=None,
              help="v2: the same with a budget per row of this times the row's mean bound on the top-k truncation KL. "
                   "The default rule (0.015) when no --top-p/--kl-budget/--kl-scale is given.")
@click.option("--targets", type=click.Choice(["topk", "sampled"]), default="topk", show_default=True,
              help="sampled: store --samples draws from the teacher (Random-Sampling KD, unbiased); needs hf.")
@click.option("--samples", type=int, default=50, show_default=True, help="Draws per position with --targets sampled.")
@click.option("--seq-len", type=int, default=1024, show_default=True)
@click.option("--val-fraction", type=float, default=0.02, show_default=True)
@click.option("--split-seed", type=int, default=0, show_default=True)
@click.option("--max-tokens-per-domain", type=int, default=None)
@click.option("--batch-size", type=int, default=32, show_default=True, help="Rows per engine call.")
@click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16"]), default="auto", show_default=True)
@click.option("--text-field", default="text", show_default=True)
@click.option("--num-workers", type=int, default=1, show_default=True)
@click.option("--worker-index", type=int, default=0, show_default=True)
@click.option("--shard-size-mb", type=float, default=256.0, show_default=True, help="Target shard size.")
@click.option("--gpu-memory-utilization", type=float, default=None,
              help="vLLM: share of GPU memory (on CPU: of host RAM) for the engine. Default 0.85 GPU, 0.25 CPU.")
@click.option("--vllm-output", type=click.Choice(["auto", "hidden", "logprobs"]), default="auto", show_default=True,
              help="vLLM: hidden = final hidden states out, head and top-k run by kdcache (Llama, Mistral, Qwen2/3); "
                   "logprobs = vLLM's prompt_logprobs (any model, slower); auto = hidden where it can.")
@click.option("--tensor-parallel-size", type=int, default=1, show_default=True,
              help="vLLM: GPUs that split each layer of the teacher (within a node).")
@click.option("--pipeline-parallel-size", type=int, default=1, show_default=True,
              help="vLLM: pipeline stages the teacher's layers are split into (GPUs or nodes).")
@click.option("--config", "config_path", default=None,
              help="YAML file: any of these options (underscored names) and `data: {domain: path}`.")
@click.pass_context
def capture(ctx: click.Context, config_path: str | None, data: tuple[str, ...], **options) -> None:
    """Run the teacher once over the corpus and write its top-k log-probabilities to a cache."""
    from .capture import CaptureConfig, run_capture
    from .corpus import load_mixture, parse_data_spec

    specs = [parse_data_spec(d) for d in data]
    if config_path:
        file_options = _yaml_options(config_path)
        if not specs and "data" in file_options:
            specs = load_mixture(config_path)
        file_options.pop("data", None)
        _apply_file_options(ctx, config_path, file_options, options)
    for name in ("teacher", "out"):
        if not options[name]:
            raise click.UsageError(f"Missing option '--{name}'.")
    run_capture(CaptureConfig(data=tuple(specs), **options))


def _apply_file_options(ctx: click.Context, path: str, file_options: dict, options: dict) -> None:
    """Options from a --config file fill in what the command line left at its default."""
    for name, value in file_options.items():
        if name not in options:
            raise KdcacheError(f"{path}: unknown option {name!r}")
        if ctx.get_parameter_source(name) == click.core.ParameterSource.DEFAULT:
            options[name] = value


def _yaml_options(path: str) -> dict:
    import yaml
    try:
        with open(path) as f:
            d = yaml.safe_load(f) or {}
    except OSError as e:
        raise KdcacheError(f"--config {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise KdcacheError(f"--config {path}: malformed YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(d, dict):
        raise KdcacheError(f"--config {path}: expected a mapping of option names to values")
    return {k.replace("-", "_"): v for k, v in d.items()}


@cli.command()
@click.argument("parts", nargs=-1, required=True)
@click.option("--out", required=True, help="Directory for the merged cache (new or empty).")
def merge(parts: tuple[str, ...], out: str) -> None:
    """Join the caches written by capture workers into one cache."""
    from .merge import run_merge
    run_merge(list(parts), out)


@cli.command()
@click.argument("cache")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def inspect(cache: str, as_json: bool) -> None:
    """Teacher, tokenizer, k, domains, tokens and bytes per token of a cache."""
    summary = cache_summary(cache)
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    t = summary["teacher"]
    click.echo(f"cache      {cache}  (format {summary['format_version']}, codec {summary['codec']['name']})")
    click.echo(f"teacher    {t['name']}  [{t['engine']} {t['engine_version']}, {t['dtype']}, {t['logprobs_mode']}]")
    click.echo(f"tokenizer  vocab {summary['tokenizer']['vocab_size']}, eos {summary['tokenizer']['eos_id']}, "
               f"fingerprint {summary['tokenizer']['fingerprint'][:12]}")
    click.echo(f"top_k      {summary['top_k']}   seq_len {summary['seq_len']}")
    click.echo(f"{'split':<6} {'domain':<16} {'rows':>8} {'tokens':>12} {'bytes':>12} {'B/token':>8}")
    for split, domains in summary["splits"].items():
        for name, d in domains.items():
            click.echo(f"{split:<6} {name:<16} {d['rows']:>8} {d['tokens']:>12} {d['bytes']:>12} "
                       f"{d['bytes_per_token']:>8.1f}")
    tot = summary["total"]
    click.echo(f"{'total':<23} {tot['rows']:>8} {tot['tokens']:>12} {tot['bytes']:>12} {tot['bytes_per_token']:>8.1f}")


def option_args(options: dict) -> list[str]:
    """{config field: value} -> the command line's options (True -> --flag, False -> --no-flag, None -> omitted)."""
    out = []
    for k, v in options.items():
        flag = "--" + k.replace("_", "-")
        if v is True:
            out.append(flag)
        elif v is False:
            out.append("--no-" + k.replace("_", "-"))
        elif v is not None:
            out += [flag, str(v)]
    return out


def cache_summary(path: str) -> dict:
    m = open_cache(path).manifest
    per_token = lambda b, t: round(b / t, 2) if t else 0.0  # noqa: E731
    splits = {
        split: {name: {"rows": d.rows, "tokens": d.tokens, "shards": len(d.shards),
                       "bytes": sum(s.bytes for s in d.shards),
                       "bytes_per_token": per_token(sum(s.bytes for s in d.shards), d.tokens)}
                for name, d in sorted(domains.items())}
        for split, domains in sorted(m.splits.items())
    }
    rows = sum(d["rows"] for ds in splits.values() for d in ds.values())
    tokens = sum(d["tokens"] for ds in splits.values() for d in ds.values())
    nbytes = sum(d["bytes"] for ds in splits.values() for d in ds.values())
    md = m.to_dict()
    return {"format_version": m.format_version, "codec": m.codec, "teacher": md["teacher"],
            "tokenizer": md["tokenizer"], "top_k": m.top_k, "seq_len": m.seq_len, "split": md["split"],
            "splits": splits,
            "total": {"rows": rows, "tokens": tokens, "bytes": nbytes, "bytes_per_token": per_token(nbytes, tokens)}}


@cli.command()
@click.argument("cache")
def verify(cache: str) -> None:
    """Check every shard's checksum, schema and counts; exit 1 naming the first bad one."""
    r = verify_cache(cache)
    click.echo(f"OK {cache}: {r.shards} shards, {r.rows} rows, {r.tokens} tokens, {r.bytes} bytes")


@cli.command()
@click.option("--cache", required=True)
@click.option("--student", required=True, help="HF model directory of the student.")
@click.option("--out", required=True, help="profile.json to write.")
@click.option("--split", type=click.Choice(["train", "val"]), default="val", show_default=True)
@click.option("--batch-size", type=int, default=8, show_default=True)
@click.option("--max-rows-per-domain", type=int, default=None,
              help="Validation budget in sequences per domain (default: all).")
def profile(cache: str, student: str, out: str, split: str, batch_size: int, max_rows_per_domain: int | None) -> None:
    """Per-domain student-vs-teacher gap on held-out data (DDK's domain discrepancy) and DDK's initial weights."""
    from .profile import format_profile_table, run_profile

    result = run_profile(cache, student, out, split=split, batch_size=batch_size,
                         max_rows_per_domain=max_rows_per_domain)
    click.echo(format_profile_table(result))
    logging.getLogger("kdcache").info("profile written to %s", out)


def _train_default(name: str):
    from trainer.train import TrainConfig
    return TrainConfig.__dataclass_fields__[name].default


def _opt(name: str, type_=None, help_: str | None = None, **kw):
    """A train option whose default is TrainConfig's."""
    flag = "--" + name.replace("_", "-")
    if type_ is bool:
        flag = f"{flag}/--no-{name.replace('_', '-')}"
    return click.option(flag, name, type=None if type_ is bool else type_, default=_train_default(name),
                        show_default=True, help=help_, **kw)


@cli.command()
@click.option("--cache", help="Cache directory written by `kdcache capture`.")
@click.option("--student", help="HF model directory of the student (same tokenizer as the teacher).")
@click.option("--out", help="Run directory: metrics, checkpoints, final student, plots.")
@_opt("loss", click.Choice(["fkl", "rkl", "jsd", "sfkl", "srkl", "tvd", "akl", "ce"]),
      "Divergence on the K+1 buckets; ce = plain continued pre-training (no teacher).")
@_opt("kd_weight", float, "Weight of the KD term (default 1, DDK: 0.2).")
@_opt("ce_weight", float, "Weight of CE on the actual next token, mixed into any KD loss (default 0, DDK: 1).")
@_opt("temperature", float)
@_opt("jsd_beta", float, "jsd: 0 = forward KL, 1 = reverse KL (TRL GKD convention).")
@_opt("skew_alpha", float, "sfkl/srkl: the skew (DistiLLM).")
@_opt("akl_mu", float, "akl: head mass threshold.")
@_opt("sampling", click.Choice(["natural", "uniform", "ddk"]),
      "Domain mix: natural = token shares, uniform, ddk = follows the student-teacher gap (DDK).")
@_opt("ddk_alpha", float, "DDK: smoothing of the weight update (Eq. 2).")
@_opt("ddk_interval", float, "DDK: steps between updates, or a fraction of the run if < 1 (default: ~30 updates).")
@_opt("ddk_val_rows", int, "DDK: val sequences per domain per measurement.")
@_opt("ddk_profile", str, "DDK: start from a `kdcache profile` JSON instead of measuring at step 0.")
@_opt("adakd", bool, "AdaKD: distil the hardest tokens (LATF) at per-token temperatures (IDTS).")
@_opt("latf", bool, "With --adakd: loss-driven adaptive token focusing.")
@_opt("idts", bool, "With --adakd: inverse-difficulty temperatures (base: --temperature).")
@_opt("adakd_c", float, "IDTS intensity: temperatures in [T e^-c, T e^c].")
@_opt("adakd_beta", float, "LATF: EMA decay of the KD loss, in (0, 1).")
@_opt("adakd_eps", float, "LATF: tolerance band.")
@_opt("adakd_delta", float, "LATF: ratio step, in (0, 1).")
@_opt("adakd_min_ratio", float, "LATF: lowest share of tokens distilled.")
@_opt("adakd_warmup_fraction", float, "LATF: share of the steps before the ratio adapts.")
@_opt("steps", int, "Optimizer steps.")
@_opt("batch_size", int, "Rows per micro-batch.")
@_opt("grad_accum", int, "Micro-batches per optimizer step.")
@_opt("lr", float, "Peak learning rate (AdamW).")
@_opt("min_lr_ratio", float, "Cosine decays to lr * this.")
@_opt("warmup_steps", int, "Linear warm-up steps (default: 5 % of --steps).")
@_opt("weight_decay", float)
@_opt("grad_clip", float, "Max gradient norm (0: no clipping).")
@_opt("seed", int)
@_opt("chunk_size", int, "Positions per lm_head chunk (memory vs speed).")
@_opt("precision", click.Choice(["auto", "fp32", "bf16"]), "auto: bf16 autocast on GPU, fp32 on CPU.")
@_opt("gradient_checkpointing", bool)
@_opt("compile", bool, "torch.compile the student body.")
@_opt("fsdp", bool, "Under torchrun: shard parameters, gradients and optimizer state (FSDP2) instead of DDP.")
@_opt("device", str, "Default: cuda if available, else cpu.")
@_opt("save_every", int, "Checkpoint every N steps (0: none); needed for --resume.")
@_opt("keep_checkpoints", int)
@_opt("log_every", int, "Write a metrics.jsonl record every N steps.")
@_opt("eval_rows", int, "Val rows per domain for the final eval (0: skip).")
@_opt("prefetch", int, "Batches read ahead on a background thread.")
@click.option("--config", "config_path", default=None, help="YAML file: any of these options (underscored names).")
@click.option("--resume", is_flag=True, help="Continue RUN from its latest checkpoint (same config and cache).")
@click.pass_context
def train(ctx: click.Context, config_path: str | None, **options) -> None:
    """Train a student from the cache (never loads the teacher)."""
    from trainer.train import TrainConfig, run_train

    if config_path:
        _apply_file_options(ctx, config_path, _yaml_options(config_path), options)
    for name in ("cache", "student", "out"):
        if not options[name]:
            raise click.UsageError(f"Missing option '--{name}'.")
    run_train(TrainConfig(**options))


@cli.command("eval")
@click.option("--cache", required=True)
@click.option("--student", required=True, help="HF model directory of the student.")
@click.option("--split", type=click.Choice(["train", "val"]), default="val", show_default=True)
@click.option("--batch-size", type=int, default=8, show_default=True)
@click.option("--max-rows-per-domain", type=int, default=None, help="Evaluate on at most this many rows per domain.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def eval_(cache: str, student: str, split: str, batch_size: int, max_rows_per_domain: int | None,
          as_json: bool) -> None:
    """Per-domain student CE, teacher CE, KL(teacher||student) and perplexity."""
    from trainer.evaluate import evaluate
    from trainer.student import load_student

    c = open_cache(cache)
    model, _ = load_student(student, c.manifest)
    report = evaluate(c, model, split=split, batch_size=batch_size, max_rows_per_domain=max_rows_per_domain)
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    click.echo(f"{'domain':<16} {'tokens':>10} {'student_ce':>11} {'teacher_ce':>11} {'kl':>8} {'ppl':>10}")
    for name, d in [*report["domains"].items(), ("mean", report["mean"])]:
        click.echo(f"{name:<16} {d['tokens']:>10} {d['student_ce']:>11.4f} {d['teacher_ce']:>11.4f} "
                   f"{d['kl']:>8.4f} {d['ppl']:>10.2f}")


@cli.command()
@click.option("--out", default="demo-out", show_default=True, help="Output directory (re-running continues).")
@click.option("--backend", type=click.Choice(["vllm", "hf"]), default="vllm", show_default=True,
              help="Capture engine.")
@click.option("--steps", type=int, default=600, show_default=True, help="Training steps per compared method.")
@click.option("--warmup-steps", type=int, default=200, show_default=True,
              help="CE steps that pre-train the shipped random-init student first.")
@click.option("--max-tokens-per-domain", type=int, default=120_000, show_default=True,
              help="Corpus tokens captured per domain.")
@click.option("--threads", type=int, default=1, show_default=True,
              help="torch threads for the student stages (0: torch's default); the demo's models are tiny.")
def demo(out: str, backend: str, steps: int, warmup_steps: int, max_tokens_per_domain: int, threads: int) -> None:
    """The whole pipeline on the shipped reference corpus, teacher and student: capture -> inspect -> profile ->
    train CPT, KD and DDK+AdaKD -> eval; writes OUT/report.md and PNG plots."""
    from .demo import DemoConfig, run_demo
    report = run_demo(DemoConfig(out=out, backend=backend, steps=steps, warmup_steps=warmup_steps,
                                 max_tokens_per_domain=max_tokens_per_domain, threads=threads))
    click.echo(f"report: {report}")


def main() -> None:
    cli(prog_name="kdcache")


if __name__ == "__main__":
    main()
