"""The `kdcache` command group. Commands only parse options into a stage's frozen config and call its run_*
function; every option's default is its config field's."""

import functools
import json
import logging
import os
import signal
import sys
import threading

import click

from cache_format import KdcacheError, read_manifest, verify_cache
from trainer.config import TrainConfig
from trainer.evaluate import EvalConfig
from trainer.profile import ProfileConfig

from . import __version__
from .config import CaptureConfig
from .demo import DemoConfig
from .merge import MergeConfig
from .options import config_option, merge_config_file, require


class Terminated(BaseException):
    """SIGTERM arrived (a scheduler's preemption, `kill`): raised where the main thread is, so that every stage
    unwinds as on any error (the in-flight .tmp removed, engines shut down)."""


def _terminate(signum, frame):
    raise Terminated()


class KdcacheGroup(click.Group):
    """Turns every failure into one `Error: ...` line and exit code 1 (a traceback only with --debug); SIGTERM
    into one line and exit code 143."""

    def invoke(self, ctx: click.Context):
        main = threading.current_thread() is threading.main_thread()      # where signal handlers can be set
        previous = signal.signal(signal.SIGTERM, _terminate) if main else None
        try:
            return super().invoke(ctx)
        except Terminated:
            how = "with --resume to continue" if ctx.invoked_subcommand == "train" else "to resume"
            click.echo(f"Error: interrupted (SIGTERM); re-run the same command {how}", err=True)
            ctx.exit(143)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except Exception as e:
            if ctx.meta.get("kdcache.debug") or os.environ.get("KDCACHE_DEBUG"):
                raise
            msg = str(e) if isinstance(e, KdcacheError) else f"{type(e).__name__}: {e} (--debug shows the traceback)"
            click.echo(f"Error: {msg}", err=True)
            ctx.exit(1)
        finally:
            if main:
                signal.signal(signal.SIGTERM, previous)


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


_capture = functools.partial(config_option, CaptureConfig)     # an option whose default is CaptureConfig's


@cli.command()
@_capture("teacher", str, "HF model directory of the teacher.")
@_capture("teacher_url", str, "Instead of --teacher: a vLLM server of the teacher (repeatable: a fleet; "
          "python -m vllm.entrypoints.openai.api_server, --enable-scale-out for the faster token endpoint).",
          multiple=True)
@_capture("tokenizer", str, "With --teacher-url: the teacher's tokenizer directory (checked against each server).")
@_capture("max_concurrency", int, "With --teacher-url: requests in flight per server.")
@_capture("request_timeout", float, "With --teacher-url: seconds before a request counts as failed (then retried).")
@_capture("drop_server_after", float, "With --teacher-url: seconds of failed requests after which a server is "
          "dropped (the others go on).")
@click.option("--data", "data", multiple=True, metavar="DOMAIN=PATH",
              help="Domain-tagged corpus: a file, directory or glob of .jsonl/.json/.parquet/.txt (also .jsonl.zst, "
                   ".jsonl.gz, a datasets save_to_disk dir). Repeatable.")
@_capture("out", str, "Cache directory or URL (s3://, gs://) to write (re-running the same command resumes).")
@_capture("backend", click.Choice(["vllm", "hf"]), "Default: vllm if it can run, else hf.")
@_capture("top_k", int, "Entries per position (v2: the cap).")
@_capture("codec", click.Choice(["v3", "v2", "v1"]), "v3 (default): quantised log-probs, the whole top-k listed in "
          "sorted order, one shared value for its flat part; v2: quantised, adaptive k (the default for --targets "
          "sampled and --top-p); v1: plain int32 ids + float32 log-probs.")
@_capture("top_p", float, "v2: keep the smallest prefix with this probability mass.")
@_capture("kl_budget", float, "v2/v3: keep the fewest entries whose extra KL vs --top-k entries is <= this (nats per "
          "position).")
@_capture("kl_scale", float, "v2/v3: the same with a budget per row of this times the row's mean bound on the top-k "
          "truncation KL. The default rule (v3: 0.013, v2: 0.015) when no --top-p/--kl-budget/--kl-scale is given.")
@_capture("targets", click.Choice(["topk", "sampled"]), "sampled: store --samples draws from the teacher "
          "(Random-Sampling KD, unbiased); needs hf.")
@_capture("samples", int, "Draws per position with --targets sampled.")
@_capture("seq_len", int, "Tokens per row.")
@_capture("val_fraction", float, "Share of documents held out for the val split.")
@_capture("split_seed", int, "Seed of the val/train document hash.")
@_capture("max_tokens_per_domain", int, "Stop each domain after this many tokens.")
@_capture("batch_size", int, "Rows per engine call.")
@_capture("dtype", click.Choice(["auto", "float32", "bfloat16"]), "The teacher's compute dtype.")
@_capture("text_field", str, "Field of a record that holds the text.")
@_capture("format", click.Choice(["auto", "text", "chat", "prompt-completion"]), "Records: text (--text-field), "
          "chat ({messages: [{role, content}]}), prompt-completion ({prompt, completion}: strings or message "
          "lists); auto decides per record.")
@_capture("train_on", click.Choice(["assistant", "last-assistant", "all"]), "Conversations: the tokens the student "
          "learns (the cache holds the teacher only where the next token is one of them); prompt-completion: the "
          "completion.")
@_capture("chat_template", str, "Jinja file (or chat_template.json) that renders conversations; default: the "
          "teacher tokenizer's template.")
@_capture("train_reasoning", bool, "Conversations: train an assistant turn's reasoning (reasoning_content or "
          "thinking, rendered by the template) with its reply; --no-train-reasoning keeps it as context.")
@_capture("packing", click.Choice(["isolated", "concat"]), "isolated: each document alone (own positions, no "
          "attention across documents), long conversations truncated; concat: one stream cut every --seq-len. "
          "Default: isolated when the corpus holds conversations, else concat.")
@_capture("num_workers", int, "Capture workers in all (run each with its --worker-index, then kdcache merge).")
@_capture("worker_index", int, "This worker, in 0..num_workers-1.")
@_capture("shard_size_mb", float, "Target shard size.")
@_capture("gpu_memory_utilization", float, "vLLM: share of GPU memory (on CPU: of host RAM) for the engine. "
          "Default 0.85 GPU, 0.25 CPU.")
@_capture("vllm_output", click.Choice(["auto", "hidden", "logprobs"]), "vLLM: hidden = final hidden states out, "
          "head and top-k run by kdcache (Llama, Mistral, Qwen2/3, Qwen3-MoE, Gemma 2/3, Granite, Phi, Phi-3, "
          "GPT-NeoX), checked against logprobs on the first rows; logprobs = vLLM's prompt_logprobs (any model, "
          "slower); auto = hidden where it can.")
@_capture("enforce_eager", bool, "vLLM: no torch.compile and no CUDA graphs: the engine starts faster.")
@_capture("tensor_parallel_size", int, "vLLM: GPUs that split each layer of the teacher (within a node).")
@_capture("pipeline_parallel_size", int, "vLLM: pipeline stages the teacher's layers are split into (GPUs or nodes).")
@click.option("--config", "config_path", default=None,
              help="YAML file: any of these options (underscored names) and `data: {domain: path}`.")
@click.option("--dry-run", is_flag=True, help="Check the inputs and print the plan (tokens, rows, shards, bytes, "
              "memory); write nothing.")
@click.pass_context
def capture(ctx: click.Context, config_path: str | None, dry_run: bool, data: tuple[str, ...], **options) -> None:
    """Run the teacher once over the corpus and write its top-k log-probabilities to a cache."""
    from .capture import plan_capture, run_capture
    from .corpus import load_mixture, parse_data_spec

    specs = [parse_data_spec(d) for d in data]
    from_file = merge_config_file(ctx, config_path, options, extra=("data",))
    if not specs and "data" in from_file:
        specs = load_mixture(config_path, from_file)
    if not options["teacher"] and not options["teacher_url"]:
        raise click.UsageError("Missing option '--teacher' (or --teacher-url URL with --tokenizer PATH).")
    require(options, "out")
    cfg = CaptureConfig(data=tuple(specs), **{**options, "teacher_url": tuple(options["teacher_url"] or ())})
    if dry_run:
        click.echo(_format_plan(plan_capture(cfg)))
        return
    run_capture(cfg)


@cli.command()
@click.argument("parts", nargs=-1, required=True)
@click.option("--out", required=True, help="Directory for the merged cache (new or empty).")
def merge(parts: tuple[str, ...], out: str) -> None:
    """Join the caches written by capture workers into one cache."""
    from .merge import run_merge
    run_merge(MergeConfig(parts=parts, out=out))


@cli.command()
@click.argument("cache")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def inspect(cache: str, as_json: bool) -> None:
    """Teacher, tokenizer, k, domains, tokens and bytes per token of a cache."""
    summary = read_manifest(cache).summary()
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    t = summary["teacher"]
    click.echo(f"cache      {cache}  (format {summary['format_version']}, codec {summary['codec']['name']})")
    click.echo(f"teacher    {t['name']}  [{t['engine']} {t['engine_version']}, {t['dtype']}, {t['logprobs_mode']}]")
    tok = summary["tokenizer"]
    click.echo(f"tokenizer  vocab {tok['vocab_size']}, eos {tok['eos_id']}, fingerprint {tok['fingerprint'][:12]}, "
               f"token bytes {tok['token_bytes'] or 'not recorded (no --cross-tokenizer students)'}")
    click.echo(f"top_k      {summary['top_k']}   seq_len {summary['seq_len']}   packing {summary['packing']}")
    click.echo(f"{'split':<6} {'domain':<16} {'rows':>8} {'tokens':>12} {'supervised':>12} {'bytes':>12} "
               f"{'B/token':>8}")
    for split, domains in summary["splits"].items():
        for name, d in domains.items():
            click.echo(f"{split:<6} {name:<16} {d['rows']:>8} {d['tokens']:>12} {d['supervised_tokens']:>12} "
                       f"{d['bytes']:>12} {d['bytes_per_token']:>8.1f}")
    tot = summary["total"]
    click.echo(f"{'total':<23} {tot['rows']:>8} {tot['tokens']:>12} {tot['supervised_tokens']:>12} {tot['bytes']:>12} "
               f"{tot['bytes_per_token']:>8.1f}")


@cli.command()
@click.argument("cache")
def verify(cache: str) -> None:
    """Check every shard's checksum, schema and counts; exit 1 naming the first bad one."""
    r = verify_cache(cache)
    click.echo(f"OK {cache}: {r.shards} shards, {r.rows} rows, {r.tokens} tokens, {r.bytes} bytes")


@cli.command()
@config_option(ProfileConfig, "cache", str, "Cache directory written by `kdcache capture`.", required=True)
@config_option(ProfileConfig, "student", str, "HF model directory of the student.", required=True)
@config_option(ProfileConfig, "out", str, "profile.json to write.", required=True)
@config_option(ProfileConfig, "split", click.Choice(["train", "val"]))
@config_option(ProfileConfig, "batch_size", int)
@config_option(ProfileConfig, "max_rows_per_domain", int, "Validation budget in sequences per domain (default: all).")
@config_option(ProfileConfig, "device", str, "Default: cuda if available, else cpu.")
def profile(**options) -> None:
    """Per-domain student-vs-teacher gap on held-out data (DDK's domain discrepancy) and DDK's initial weights."""
    from trainer.profile import format_profile_table, run_profile

    result = run_profile(ProfileConfig(**options))
    click.echo(format_profile_table(result))
    logging.getLogger("kdcache").info("profile written to %s", options["out"])


_train = functools.partial(config_option, TrainConfig)


@cli.command()
@_train("cache", str, "Cache directory written by `kdcache capture`.")
@_train("student", str, "HF model directory of the student (the teacher's tokenizer, or any with "
                        "--cross-tokenizer).")
@_train("out", str, "Run directory: metrics, checkpoints, final student, plots.")
@_train("loss", click.Choice(["fkl", "rkl", "jsd", "sfkl", "srkl", "tvd", "akl", "ce"]),
        "Divergence on the K+1 buckets; ce = plain continued pre-training (no teacher).")
@_train("kd_weight", float, "Weight of the KD term (default 1, DDK: 0.2).")
@_train("ce_weight", float, "Weight of CE on the actual next token, mixed into any KD loss (default 0; DDK and "
        "--cross-tokenizer: 1).")
@_train("temperature", float)
@_train("tau_squared", bool, "Weight tempered losses by tau^2 (Hinton; AdaKD's code); off: the tempered divergence "
        "itself.")
@_train("jsd_beta", float, "jsd: 0 = forward KL, 1 = reverse KL (TRL GKD convention).")
@_train("skew_alpha", float, "sfkl/srkl: the skew (DistiLLM).")
@_train("akl_mu", float, "akl: head mass threshold.")
@_train("sampling", click.Choice(["natural", "uniform", "ddk"]),
        "Domain mix: natural = token shares, uniform, ddk = follows the student-teacher gap (DDK).")
@_train("ddk_alpha", float, "DDK: smoothing of the weight update (Eq. 2).")
@_train("ddk_interval", float, "DDK: steps between updates, or a fraction of the run if < 1 (default: ~30 updates).")
@_train("ddk_val_rows", int, "DDK: val sequences per domain per measurement.")
@_train("ddk_profile", str, "DDK: start from a `kdcache profile` JSON instead of measuring at step 0.")
@_train("adakd", bool, "AdaKD: distil the hardest tokens (LATF) at per-token temperatures (IDTS).")
@_train("latf", bool, "With --adakd: loss-driven adaptive token focusing.")
@_train("idts", bool, "With --adakd: inverse-difficulty temperatures (base: --temperature).")
@_train("adakd_c", float, "IDTS intensity: temperatures in [T e^-c, T e^c].")
@_train("adakd_beta", float, "LATF: EMA decay of the KD loss, in (0, 1).")
@_train("adakd_eps", float, "LATF: tolerance band.")
@_train("adakd_delta", float, "LATF: ratio step, in (0, 1).")
@_train("adakd_min_ratio", float, "LATF: lowest share of tokens distilled.")
@_train("adakd_warmup_fraction", float, "LATF: share of the steps before the ratio adapts.")
@_train("steps", int, "Optimizer steps.")
@_train("batch_size", int, "Rows per micro-batch.")
@_train("grad_accum", int, "Micro-batches per optimizer step.")
@_train("lr", float, "Peak learning rate (AdamW).")
@_train("min_lr_ratio", float, "Cosine decays to lr * this.")
@_train("warmup_steps", int, "Linear warm-up steps (default: 5 % of --steps).")
@_train("weight_decay", float)
@_train("adam_beta1", float)
@_train("adam_beta2", float)
@_train("grad_clip", float, "Max gradient norm (0: no clipping).")
@_train("seed", int)
@_train("chunk_size", int, "Positions per lm_head chunk (memory vs speed).")
@_train("precision", click.Choice(["auto", "fp32", "bf16"]), "auto: bf16 autocast on GPU, fp32 on CPU.")
@_train("gradient_checkpointing", bool)
@_train("compile", bool, "torch.compile the student body.")
@_train("fsdp", bool, "Under torchrun: shard parameters, gradients and optimizer state (FSDP2) instead of DDP.")
@_train("device", str, "Default: cuda if available, else cpu.")
@_train("save_every", int, "Checkpoint every N steps (0: none); needed for --resume.")
@_train("keep_checkpoints", int)
@_train("log_every", int, "Write a metrics.jsonl record every N steps.")
@_train("eval_rows", int, "Val rows per domain for the final eval (0: skip).")
@_train("prefetch", int, "Batches read ahead on a background thread.")
@_train("cross_tokenizer", bool, "The student has another tokenizer: align it with the teacher's by byte spans; KD "
        "where the next tokens match exactly (needs a cache that records token bytes).")
@_train("unaligned", click.Choice(["chunk", "skip"]), "--cross-tokenizer: chunks that do not align exactly are "
        "distilled by their likelihood (chunk) or not at all (skip).")
@click.option("--resume", is_flag=True, help="Continue RUN from its latest checkpoint (same config and cache).")
@click.option("--config", "config_path", default=None, help="YAML file: any of these options (underscored names).")
@click.option("--dry-run", is_flag=True, help="Check the inputs and print the plan (steps, tokens, epochs, "
              "memory); write nothing.")
@click.pass_context
def train(ctx: click.Context, config_path: str | None, dry_run: bool, **options) -> None:
    """Train a student from the cache (never loads the teacher)."""
    from trainer.train import plan_train, run_train

    merge_config_file(ctx, config_path, options)
    require(options, "cache", "student", "out")
    cfg = TrainConfig(**options)
    if dry_run:
        click.echo(_format_plan(plan_train(cfg)))
        return
    run_train(cfg)


@cli.command("eval")
@config_option(EvalConfig, "cache", str, "Cache directory written by `kdcache capture`.", required=True)
@config_option(EvalConfig, "student", str, "HF model directory of the student.", required=True)
@config_option(EvalConfig, "split", click.Choice(["train", "val"]))
@config_option(EvalConfig, "batch_size", int)
@config_option(EvalConfig, "max_rows_per_domain", int, "Evaluate on at most this many rows per domain.")
@config_option(EvalConfig, "out", str, "Also write the report (with the config) as JSON to this file.")
@config_option(EvalConfig, "device", str, "Default: cuda if available, else cpu.")
@config_option(EvalConfig, "generate", int, "Also generate the last reply of this many conversations per domain "
               "(greedy unless --temperature) and score it with ROUGE-L against the cache's (chat caches; 0: off).")
@config_option(EvalConfig, "max_new_tokens", int, "With --generate: tokens per generated reply.")
@config_option(EvalConfig, "teacher", str, "With --generate: HF model directory of the teacher, whose own replies "
               "are scored too (the ceiling).")
@config_option(EvalConfig, "temperature", float, "With --generate: sample replies from the softmax at this "
               "temperature (> 0) instead of greedy ones.")
@config_option(EvalConfig, "top_p", float, "With --temperature: sample from the top-p nucleus, in (0, 1] "
               "(transformers' rule).")
@config_option(EvalConfig, "samples", int, "With --temperature: seeded draws per reply; the report holds their mean "
               "and standard deviation.")
@config_option(EvalConfig, "seed", int, "With --temperature: draw s uses seed + s.")
@config_option(EvalConfig, "cross_tokenizer", bool, "The student has another tokenizer: measure it on its own tokens "
               "(CE/KL where they align exactly with the teacher's, the aligned share and CE on all of them).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def eval_(as_json: bool, **options) -> None:
    """Per-domain student CE, teacher CE, KL(teacher||student) and perplexity; with --generate, ROUGE-L of
    greedy or sampled replies."""
    from trainer.evaluate import run_eval

    report = run_eval(EvalConfig(**options))
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    cross = "aligned_share" in report["mean"]
    click.echo(f"{'domain':<16} {'tokens':>10} {'student_ce':>11} {'teacher_ce':>11} {'kl':>8} {'ppl':>10}"
               + (f" {'aligned':>8} {'trained_ce':>11} {'ce_per_byte':>12}" if cross else ""))
    for name, d in [*report["domains"].items(), ("mean", report["mean"])]:
        click.echo(f"{name:<16} {d['tokens']:>10} {d['student_ce']:>11.4f} {d['teacher_ce']:>11.4f} "
                   f"{d['kl']:>8.4f} {d['ppl']:>10.2f}"
                   + (f" {d['aligned_share']:>8.3f} {d['trained_ce']:>11.4f} {d['ce_per_byte']:>12.4f}" if cross
                      else ""))
    gen = report.get("generate")
    if gen:
        models = list(gen)                                      # student, then teacher with --teacher
        click.echo(f"\n{'domain':<16} {'replies':>10} " + " ".join(f"{'rouge_l ' + m:>16}" for m in models))
        for name in [*gen["student"]["domains"], "mean"]:
            rows = [gen[m]["mean"] if name == "mean" else gen[m]["domains"][name] for m in models]
            click.echo(f"{name:<16} {rows[0]['n']:>10} " + " ".join(
                f"{r['rouge_l']:>16.4f}" if "rouge_l_std" not in r else
                f"{format(r['rouge_l'], '.4f') + ' ± ' + format(r['rouge_l_std'], '.4f'):>16}" for r in rows))


@cli.command()
@config_option(DemoConfig, "out", str, "Output directory (re-running continues).")
@config_option(DemoConfig, "backend", click.Choice(["vllm", "hf"]), "Capture engine.")
@config_option(DemoConfig, "steps", int, "Training steps per compared method.")
@config_option(DemoConfig, "warmup_steps", int, "CE steps that pre-train the shipped random-init student first.")
@config_option(DemoConfig, "max_tokens_per_domain", int, "Corpus tokens captured per domain.")
@config_option(DemoConfig, "threads", int, "torch threads for the student stages (0: torch's default); the demo's "
               "models are tiny.")
def demo(**options) -> None:
    """The whole pipeline on the shipped reference corpus, teacher and student: capture -> inspect -> profile ->
    train CPT, KD and DDK+AdaKD -> eval; writes OUT/report.md and PNG plots."""
    from .demo import run_demo
    click.echo(f"report: {run_demo(DemoConfig(**options))}")


def _format_plan(plan: dict) -> str:
    """A --dry-run plan, one `key  value` line per entry, nested mappings indented; numbers with thousands
    separators, sizes (keys with "bytes") in binary units too."""
    def value(k: str, v) -> str:
        if not isinstance(v, int):
            return str(v)
        if "bytes" in k:
            for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
                if v >= scale:
                    return f"{v / scale:.2f} {unit} ({v:,})"
        return f"{v:,}"

    def lines(d: dict, indent: str) -> list[str]:
        out = []
        for k, v in d.items():
            out += [f"{indent}{k}", *lines(v, indent + "  ")] if isinstance(v, dict) else \
                [f"{indent}{k:<{34 - len(indent)}} {value(k, v)}"]
        return out
    return "\n".join(["dry run: nothing was written", *lines(plan, "")])


def main() -> None:
    cli(prog_name="kdcache")


if __name__ == "__main__":
    main()
