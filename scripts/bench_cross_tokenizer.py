"""Cross-tokenizer distillation from one cache: CPT vs cross-tokenizer KD vs same-tokenizer KD, equal steps.

    python scripts/bench_cross_tokenizer.py [--work build/bench-cross] [--steps 600] [--warmup-steps 200]
        [--students byte-level:2048,metaspace:1536] [--seeds 0,1] [--doc docs/benchmarks.md]   # ~35 min

1. the cache: the shipped reference teacher (byte-level BPE, 1,024 ids) over the reference corpus (four text
   domains and the chat domain), through the CLI (`kdcache capture --backend hf --top-k 64 --seq-len 128`);
2. the student tokenizers (--students KIND:IDS), each a BPE of at most IDS ids trained on the same corpus:
   `byte-level` has the teacher's pre-tokenizer and special tokens and another size (other merges, and BPE training
   stops early on this small corpus: 1,277 ids); `metaspace` is SentencePiece-style
   (Llama 2's layout: "▁" words, digits not split, byte fallback, none of the teacher's chat markers). One student
   per tokenizer, of the shipped student's shape (random init); the shipped student has the teacher's tokenizer;
3. each student is warmed up with CE (--warmup-steps, as the demo does), then every method trains from its
   warmed-up student for --steps with the same batch, lr and seed (`kdcache train`): CPT and the KD variants on
   every tokenizer (cross-tokenizer on the students', same-tokenizer on the teacher's);
4. `kdcache eval --cross-tokenizer --json` on the val split scores every student on its own tokens: nats per byte
   of text (comparable across tokenizers), CE per own token, and the share of positions aligned exactly (the
   teacher-tokenizer student, through the same alignment, aligns 100 %: a check); training speed is rows/s and
   tokens/s from metrics.jsonl;
5. the table and the plot (docs/cross_tokenizer.png) go to --doc between CROSS-TOKENIZER markers, and
   WORK/results.json; StudentRows' own speed (teacher rows -> student rows on one core) is measured too.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from pipeline.options import option_args  # noqa: E402
from trainer.run_dir import read_metrics  # noqa: E402

ASSETS = ROOT / "pipeline" / "assets" / "reference"
DOMAINS = ("code", "data", "prose", "arith", "chat")
BEGIN, END = "<!-- CROSS-TOKENIZER BEGIN -->", "<!-- CROSS-TOKENIZER END -->"

# name: `kdcache train` options; CROSS on each student tokenizer (with --cross-tokenizer, whose CE weight is 1 by
# default), SAME on the teacher's. "KD + CE" is the like-for-like pair.
CROSS = {
    "CPT": dict(loss="ce"),
    "KD + CE, --unaligned chunk": dict(loss="fkl"),
    "KD + CE, --unaligned skip": dict(loss="fkl", unaligned="skip"),
    "KD alone, --unaligned chunk": dict(loss="fkl", ce_weight=0.0),
    "DDK+AdaKD + CE, --unaligned chunk": dict(loss="fkl", sampling="ddk", kd_weight=1.0, adakd=True),
}
SAME = {
    "CPT": dict(loss="ce"),
    "KD + CE": dict(loss="fkl", ce_weight=1.0),
    "KD alone": dict(loss="fkl"),
    "DDK+AdaKD + CE": dict(loss="fkl", sampling="ddk", kd_weight=1.0, adakd=True),
}
TEACHER_TOKENIZER = "teacher's (byte-level, 1,024)"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def kdcache(args: list[str], logfile: Path) -> float:
    """Run `python -m pipeline ARGS` (one torch thread), its output to logfile; seconds taken."""
    t0 = time.perf_counter()
    with open(logfile, "w") as f:
        r = subprocess.run([sys.executable, "-m", "pipeline", *args], stdout=f, stderr=subprocess.STDOUT, cwd=ROOT,
                           env={**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"})
    if r.returncode:
        sys.exit(f"failed ({r.returncode}): kdcache {' '.join(args)}; see {logfile}")
    return time.perf_counter() - t0


def corpus_texts() -> list[str]:
    """The reference corpus as plain text (a conversation: its messages' contents)."""
    texts = []
    for d in DOMAINS:
        for line in (ASSETS / "corpus" / f"{d}.jsonl").read_text().splitlines():
            rec = json.loads(line)
            texts += [m["content"] for m in rec["messages"]] if "messages" in rec else [rec["text"]]
    return texts


def build_student_tokenizer(out: Path, kind: str, vocab_size: int):
    """A BPE of vocab_size ids trained on the corpus. byte-level: the teacher's pre-tokenizer (single digits, GPT-2
    byte-level) and special tokens (its merges differ: another size). metaspace: a SentencePiece-style BPE as Llama 2
    and Mistral have (words marked with "▁", digits not split, 256 byte-fallback tokens, <unk> <s> </s> and none of
    the teacher's chat markers, which it reads as text)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    teacher = AutoTokenizer.from_pretrained(ASSETS / "teacher")
    tok = Tokenizer(models.BPE())
    if kind == "byte-level":
        specials = sorted({t for t in teacher.get_vocab() if t.startswith("<|") and t.endswith("|>")},
                          key=teacher.convert_tokens_to_ids)
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False)])
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(corpus_texts(), trainer=trainer)
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=teacher.eos_token, bos_token=teacher.bos_token)
    else:
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
        trainer = trainers.BpeTrainer(vocab_size=vocab_size - 256, special_tokens=["<unk>", "<s>", "</s>"],
                                      show_progress=False)
        tok.train_from_iterator(corpus_texts(), trainer=trainer)
        spec = json.loads(tok.to_str())
        vocab = spec["model"]["vocab"]
        for b in range(256):                                     # byte fallback: every byte has a token
            vocab.setdefault(f"<0x{b:02X}>", len(vocab))
        spec["model"].update(byte_fallback=True, unk_token="<unk>")
        fast = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)), unk_token="<unk>",
                                       bos_token="<s>", eos_token="</s>")
    fast.chat_template = teacher.chat_template
    fast.save_pretrained(out)
    return fast


def build_student(out: Path, tokenizer, seed: int = 0) -> None:
    """The shipped student's architecture with the tokenizer's vocabulary, seed-fixed random init."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(ASSETS / "student")
    config.vocab_size = len(tokenizer)
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    tokenizer.save_pretrained(out)


def rows_per_second(cache: Path, tokenizer_dir: Path, rows: int = 400) -> dict:
    """StudentRows on one core: teacher train rows -> student rows, rows/s and teacher tokens/s."""
    from transformers import AutoTokenizer

    from cache_format import open_cache
    from trainer.cross_tokenizer import StudentRows

    c = open_cache(cache)
    sr = StudentRows.for_cache(c, AutoTokenizer.from_pretrained(tokenizer_dir), 1 << 30)
    got = []
    for d in c.domains("train"):
        for i, row in enumerate(c.iter_rows("train", d)):
            if i >= rows // len(c.domains("train")):
                break
            got.append(row)
    t0 = time.perf_counter()
    for row in got:
        sr(row)
    dt = time.perf_counter() - t0
    return {"rows_per_s": len(got) / dt, "teacher_tokens_per_s": sum(len(r["input_ids"]) for r in got) / dt}


def speed(run: Path, batch: int) -> dict:
    """rows/s and tokens/s over the run's loop (metrics.jsonl: elapsed_s of the last record, tokens summed)."""
    records = read_metrics(run / "metrics.jsonl")
    elapsed = records[-1]["elapsed_s"]
    return {"rows_per_s": len(records) * batch / elapsed, "tokens_per_s": sum(r["tokens"] for r in records) / elapsed}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default="build/bench-cross")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--warmup-steps", type=int, default=200)
    p.add_argument("--students", default="byte-level:2048,metaspace:1536", help="KIND:IDS,... (byte-level|metaspace)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seeds", default="0,1", help="each method is trained once per seed (its warm-up too)")
    p.add_argument("--max-tokens-per-domain", type=int, default=120_000)
    p.add_argument("--doc", default="docs/benchmarks.md")
    p.add_argument("--plot", default="docs/cross_tokenizer.png")
    p.add_argument("--report-only", action="store_true", help="re-render --doc and --plot from WORK/results.json")
    args = p.parse_args()
    work = (ROOT / args.work).resolve()
    if args.report_only:
        return publish(json.loads((work / "results.json").read_text()), args)
    (work / "logs").mkdir(parents=True, exist_ok=True)
    t_start = time.time()

    cache = work / "cache"
    if not (cache / "manifest.json").exists():
        log("capture: the reference teacher over the reference corpus")
        kdcache(["capture", "--backend", "hf", "--teacher", str(ASSETS / "teacher"), "--top-k", "64",
                 "--seq-len", "128", "--val-fraction", "0.05", "--max-tokens-per-domain",
                 str(args.max_tokens_per_domain), "--out", str(cache),
                 *[a for d in DOMAINS for a in ("--data", f"{d}={ASSETS / 'corpus' / f'{d}.jsonl'}")]],
                work / "logs" / "capture.log")
    students = {TEACHER_TOKENIZER: (ASSETS / "student", SAME, {})}
    for spec in args.students.split(","):
        kind, ids = spec.split(":")
        path = work / f"student-{kind}-{ids}"
        if not (path / "config.json").exists():
            log(f"student tokenizer: {kind} BPE of at most {ids} ids on the same corpus")
            build_student(path, build_student_tokenizer(work / f"tokenizer-{kind}-{ids}", kind, int(ids)))
        size = json.loads((path / "config.json").read_text())["vocab_size"]      # BPE training may stop early
        students[f"{kind}, {size:,}"] = (path, CROSS, {"cross_tokenizer": True})

    results = {}
    for tokenizer, (path, methods, cross) in students.items():
        slug = "-".join("".join(c if c.isalnum() else " " for c in tokenizer.lower()).split())
        for seed in map(int, args.seeds.split(",")):
            base = dict(batch_size=args.batch_size, lr=args.lr, seed=seed, eval_rows=0, log_every=1, **cross)
            runs = work / "runs" / slug / f"seed-{seed}"
            warm = runs / "warmup"
            if not (warm / "final" / "config.json").exists():
                log(f"warm-up ({tokenizer}, seed {seed}): {args.warmup_steps} CE steps")
                kdcache(["train", "--cache", str(cache), "--student", str(path), "--out", str(warm),
                         *option_args({**base, "steps": args.warmup_steps, "loss": "ce"})],
                        work / "logs" / f"{slug}-{seed}-warmup.log")
            for name, options in methods.items():
                run = runs / "-".join("".join(c if c.isalnum() else " " for c in name.lower()).split())
                if not (run / "final" / "config.json").exists():
                    log(f"train ({tokenizer}, seed {seed}): {name}")
                    kdcache(["train", "--cache", str(cache), "--student", str(warm / "final"), "--out", str(run),
                             *option_args({**base, "steps": args.steps, **options})],
                            work / "logs" / f"{slug}-{seed}-{run.name}.log")
                r = subprocess.run([sys.executable, "-m", "pipeline", "eval", "--cache", str(cache), "--student",
                                    str(run / "final"), "--cross-tokenizer", "--json"], capture_output=True,
                                   text=True, cwd=ROOT)
                if r.returncode:
                    sys.exit(f"eval failed: {r.stderr[-2000:]}")
                entry = results.setdefault(f"{tokenizer} / {name}", {"tokenizer": tokenizer, "method": name,
                                                                     "options": options, "seeds": {}})
                entry["seeds"][seed] = {"eval": json.loads(r.stdout), "speed": speed(run, args.batch_size)}
                log(f"{tokenizer} / {name} / seed {seed}: "
                    f"{entry['seeds'][seed]['eval']['mean']['ce_per_byte']:.4f} nats/byte")
    convert = {t: rows_per_second(cache, path) for t, (path, _, cross) in students.items() if cross}
    out = {"command": " ".join(["python", "scripts/bench_cross_tokenizer.py", *sys.argv[1:]]),
           "steps": args.steps, "warmup_steps": args.warmup_steps, "batch_size": args.batch_size, "lr": args.lr,
           "seeds": [int(x) for x in args.seeds.split(",")],
           "student_rows": convert, "results": results,
           "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
           "minutes": round((time.time() - t_start) / 60, 1)}
    (work / "results.json").write_text(json.dumps(out, indent=1))
    publish(out, args)


def publish(out: dict, args) -> None:
    """Print the tables, write them to args.doc between the markers, and the plot to args.plot."""
    lines = report(out)
    print("\n".join(lines))
    plot(out, ROOT / args.plot)
    doc = ROOT / args.doc
    text = doc.read_text()
    block = "\n".join([BEGIN, *lines, END])
    text = text[:text.index(BEGIN)] + block + text[text.index(END) + len(END):] if BEGIN in text else \
        text.rstrip("\n") + "\n\n" + block + "\n"
    doc.write_text(text)
    log(f"wrote {doc} and {args.plot}")


def seed_mean(entry: dict, get) -> float:
    return sum(get(r) for r in entry["seeds"].values()) / len(entry["seeds"])


def seed_range(entry: dict, get) -> str:
    values = [get(r) for r in entry["seeds"].values()]
    return f"{min(values):.4f}–{max(values):.4f}" if len(values) > 1 else ""


def report(out: dict) -> list[str]:
    res = out["results"]
    ce = lambda d: lambda r: r["eval"]["domains"][d]["ce_per_byte"]                      # noqa: E731
    mean_ce = lambda r: r["eval"]["mean"]["ce_per_byte"]                                 # noqa: E731
    rows_s = lambda r: r["speed"]["rows_per_s"]                                          # noqa: E731
    same = seed_mean(res[f"{TEACHER_TOKENIZER} / KD + CE"], rows_s)
    lines = [f"`{out['command']}` ({out['machine']}, {out['minutes']} min). Teacher: the reference teacher "
             f"(byte-level BPE, 1,024 ids). Each student is warmed up with {out['warmup_steps']} CE steps, then "
             f"trained {out['steps']} steps of batch {out['batch_size']}, lr {out['lr']}, per seed "
             f"({', '.join(map(str, out['seeds']))}: the warm-up and the run). Val nats per byte of text, "
             f"the mean over seeds (lower is better; comparable across tokenizers), its range over seeds, the "
             f"difference to the same tokenizer's CPT from the same warm-up (per seed; negative: better), CE per "
             f"own token, the share of trained positions aligned exactly (mean over domains), and training speed:",
             "",
             "| student tokenizer | method | " + " | ".join(DOMAINS) + " | **mean** | range | Δ vs CPT, per seed | "
             "CE / own token | aligned | rows/s | tokens/s | rows/s ÷ same-tok. KD + CE |",
             "|---|---|" + "---|" * (len(DOMAINS) + 8)]
    for r in res.values():
        cpt = res[f"{r['tokenizer']} / CPT"]["seeds"]
        delta = " / ".join(f"{mean_ce(x) - mean_ce(cpt[seed]):+.4f}" for seed, x in r["seeds"].items())
        lines.append(f"| {r['tokenizer']} | {r['method']} | "
                     + " | ".join(f"{seed_mean(r, ce(d)):.4f}" for d in DOMAINS)
                     + f" | **{seed_mean(r, mean_ce):.4f}** | {seed_range(r, mean_ce)} | "
                     f"{delta if r['method'] != 'CPT' else ''} | "
                     f"{seed_mean(r, lambda x: x['eval']['mean']['trained_ce']):.4f} | "
                     f"{seed_mean(r, lambda x: x['eval']['mean']['aligned_share']):.3f} | "
                     f"{seed_mean(r, rows_s):.1f} | {seed_mean(r, lambda x: x['speed']['tokens_per_s']):.0f} | "
                     f"{seed_mean(r, rows_s) / same:.2f} |")
    lines += ["", "Share of trained positions aligned exactly, per domain (val, each tokenizer's CPT student):",
              "", "| student tokenizer | " + " | ".join(DOMAINS) + " |", "|---|" + "---|" * len(DOMAINS)]
    for r in res.values():
        if r["method"] == "CPT":
            lines.append(f"| {r['tokenizer']} | " + " | ".join(
                f"{seed_mean(r, lambda x: x['eval']['domains'][d]['aligned_share']):.3f}" for d in DOMAINS) + " |")
    lines += ["", "StudentRows (teacher rows -> the student's, on the prefetch thread, one core): "
              + "; ".join(f"{t}: {c['rows_per_s']:.0f} rows/s ({c['teacher_tokens_per_s'] / 1e3:.0f}k teacher "
                          f"tokens/s)" for t, c in out["student_rows"].items()) + "."]
    return lines


def plot(out: dict, path: Path) -> None:
    """Mean val nats per byte of every method (range over seeds as error bars), one panel per student tokenizer,
    with CPT's as a dashed line."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = list(out["results"].values())
    tokenizers = list(dict.fromkeys(r["tokenizer"] for r in res))
    fig, axes = plt.subplots(1, len(tokenizers), figsize=(4.4 * len(tokenizers), 4.6), sharey=True)
    every = []
    for ax, tok in zip(axes, tokenizers):
        rows = [r for r in res if r["tokenizer"] == tok]
        values = [[s["eval"]["mean"]["ce_per_byte"] for s in r["seeds"].values()] for r in rows]
        means = [sum(v) / len(v) for v in values]
        every += [x for v in values for x in v]
        ax.bar(range(len(rows)), means, yerr=[[m - min(v) for m, v in zip(means, values)],
                                              [max(v) - m for m, v in zip(means, values)]], capsize=3,
               color=["0.6" if r["method"] == "CPT" else "C0" for r in rows])
        ax.axhline(means[0], color="0.3", lw=0.8, ls="--")
        ax.set_xticks(range(len(rows)), [r["method"].replace(", --unaligned ", "\n") for r in rows], rotation=40,
                      ha="right", fontsize=7)
        ax.set_title(f"student tokenizer: {tok}", fontsize=9)
    axes[0].set_ylim(min(every) * 0.95, min(max(every), 2 * min(every)) * 1.02)
    axes[0].set_ylabel("val nats per byte, mean of 5 domains (lower is better)")
    fig.suptitle(f"One teacher cache, three student tokenizers: {out['steps']} steps after a {out['warmup_steps']}-"
                 f"step CE warm-up (bars: mean over seeds {', '.join(map(str, out['seeds']))}; whiskers: range)",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
