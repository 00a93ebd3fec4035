"""Training overhead and memory of distillation vs plain CE, through kdcache's own training loop.

Builds (in a temp dir) a word-level tokenizer with --vocab tokens, a small Llama student with that vocabulary and a
synthetic cache of random top-k rows sharing the tokenizer, then:
  speed   runs `run_train` for each variant (ce, fkl, ...) for --steps steps, --rounds times interleaved (the
          machine's noise hits every variant alike). step tokens/s = median over the steps after the first two
          (warm-up); end to end = the same steps' tokens over their wall time including DDK's val measurements
          (--ddk-interval). Ratios to ce, side by side in one run.
  memory  in a fresh process per variant: the peak memory one training micro-step (forward + backward) adds on
          top of the loaded model and batch. CPU: VmHWM after resetting it (/proc/self/clear_refs); GPU:
          torch.cuda.max_memory_allocated. `naive` is a full-vocabulary KD loss as most tools write it: (B, T, V)
          student logits, the teacher's top-k scattered into a dense (B, T, V) distribution, F.kl_div.

    python scripts/bench_train.py [--vocab 32768] [--hidden 256] [--layers 2] [--seq-len 512] [--batch-size 4]
Prints a table and a final JSON line.
"""

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

VARIANTS = {"ce": dict(loss="ce"), "fkl": dict(loss="fkl"), "fkl+ce": dict(loss="fkl", ce_weight=0.5),
            "fkl+adakd": dict(loss="fkl", adakd=True), "ddk": dict(sampling="ddk"),
            "ddk+adakd": dict(sampling="ddk", adakd=True)}


def build(root: Path, vocab: int, hidden: int, layers: int, seq_len: int, k: int, rows: int) -> tuple[Path, Path]:
    """A student with a `vocab`-token word-level tokenizer, and a cache of random top-k rows for it."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from cache_format import (DomainInfo, Manifest, ShardWriter, SplitRule, TeacherInfo, TokenizerInfo, TopkV1,
                              tokenizer_fingerprint, write_manifest)

    student, cache = root / "student", root / "cache"
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="w1", unk_token="w0")
    fast.save_pretrained(student)
    import torch
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 4,
                                 num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
                                 num_key_value_heads=max(1, hidden // 64), max_position_embeddings=seq_len,
                                 tie_word_embeddings=False)).save_pretrained(student)

    rng = np.random.default_rng(0)
    codec = TopkV1(top_k=k)
    splits: dict = {}
    for split, domain in [("train", "a"), ("train", "b"), ("val", "a"), ("val", "b")]:
        n = rows if split == "train" else 4
        w = ShardWriter(cache, f"{split}/{domain}/shard-00000.parquet", codec, row_group_rows=8)
        for i in range(n):
            ids = rng.integers(0, vocab, size=seq_len).astype(np.int32)                     # (T,)
            top = (rng.integers(0, vocab, size=(seq_len, 1)) + np.arange(k) * 7919) % vocab   # (T, K) distinct
            lp = np.sort(rng.standard_normal((seq_len, k)) * 2, axis=-1)[:, ::-1]
            lp = (lp - np.log(np.exp(lp).sum(-1, keepdims=True)) - 0.05).astype(np.float32)  # mass 0.95 in top-k
            target = lp[:, 0].copy()
            top[-1], lp[-1], target[-1] = 0, -np.inf, np.nan
            w.write({"row_index": i, "domain": domain, "input_ids": ids, "topk_ids": top.astype(np.int32),
                     "topk_logprobs": lp, "target_logprobs": target})
        shard = w.close()
        splits.setdefault(split, {})[domain] = DomainInfo(rows=shard.rows, tokens=shard.tokens, shards=[shard])
    write_manifest(cache, Manifest(
        teacher=TeacherInfo(path="synthetic", name="synthetic", fingerprint="0" * 64, engine="synthetic",
                            engine_version="0", logprobs_mode="raw_logprobs", dtype="float32"),
        tokenizer=TokenizerInfo(vocab_size=vocab, fingerprint=tokenizer_fingerprint(fast), eos_id=1), top_k=k,
        seq_len=seq_len, codec=codec.params(), split=SplitRule(rule="synthetic", seed=0, val_fraction=0.0),
        splits=splits))
    return student, cache


def speed(root: Path, student: Path, cache: Path, variant: str, round_: int, args) -> list[dict]:
    """The metrics records of one run after its first two steps."""
    from trainer.config import TrainConfig
    from trainer.run_dir import read_metrics
    from trainer.train import run_train
    run = root / f"run-{variant}-{round_}"
    run_train(TrainConfig(cache=str(cache), student=str(student), out=str(run), steps=args.steps,
                          batch_size=args.batch_size, chunk_size=args.chunk_size, eval_rows=0, log_every=1,
                          ddk_interval=args.ddk_interval, ddk_val_rows=4, **VARIANTS[variant]))
    return read_metrics(run / "metrics.jsonl")[1:]


def memory(student: Path, cache: Path, variant: str, args) -> float:
    """Peak MiB one micro-step adds (run in this fresh process)."""
    import torch

    from cache_format import open_cache
    from trainer.data import CacheStream
    from trainer.student import load_student
    from trainer.config import TrainConfig
    from trainer.train import _Distiller, _micro_step

    c = open_cache(cache)
    model, _ = load_student(str(student), c.manifest, dtype=torch.float32)
    model.train()
    device = next(model.parameters()).device
    batch = CacheStream(c, "train", args.batch_size, seed=0).next_batch({"a": 1.0})
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
    cfg = TrainConfig(cache=str(cache), student=str(student), out="unused", chunk_size=args.chunk_size,
                      **VARIANTS.get(variant, {}))

    distiller = _Distiller(model, c.manifest.tokenizer.vocab_size, cfg.chunk_size, buckets=cfg.loss != "ce")

    def step():
        if variant == "naive":
            logits = model(input_ids=batch["input_ids"]).logits.float()                     # (B, T, V)
            log_q = logits.log_softmax(-1)                                                   # (B, T, V)
            lp = batch["topk_logprobs"]                                                      # (B, T, K)
            p = torch.zeros_like(log_q).scatter_(-1, batch["topk_ids"], lp.exp())            # (B, T, V) dense
            kl = torch.nn.functional.kl_div(log_q, p, reduction="none").sum(-1)              # (B, T)
            loss = kl[batch["loss_mask"]].mean()
        else:
            loss = _micro_step(distiller, batch, cfg)[0]
        loss.backward()
        model.zero_grad(set_to_none=False)                                                   # grads stay allocated

    step()                                                                                   # warm-up: grads exist
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    rss = lambda key: int(re.search(rf"{key}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) / 1024
    Path("/proc/self/clear_refs").write_text("5")                                          # reset the peak (VmHWM)
    base = rss("VmRSS")
    step()
    return rss("VmHWM") - base


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--top-k", type=int, default=64)
    p.add_argument("--chunk-size", type=int, default=1024)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--ddk-interval", type=int, default=5, help="DDK: steps between val measurements (4 rows/domain)")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--memory-only", metavar="ROOT:VARIANT", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.memory_only:
        root, variant = args.memory_only.rsplit(":", 1)
        print(json.dumps({"peak_mib": memory(Path(root) / "student", Path(root) / "cache", variant, args)}))
        return

    import torch
    variants = args.variants.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        student, cache = build(root, args.vocab, args.hidden, args.layers, args.seq_len, args.top_k,
                               rows=args.batch_size * (args.steps + 2))
        print(f"built student (V={args.vocab}, d={args.hidden}, {args.layers} layers) and cache in "
              f"{time.perf_counter() - t0:.0f}s", file=sys.stderr)
        runs: dict[str, list] = {v: [] for v in variants}
        for round_ in range(args.rounds):
            for v in variants:
                runs[v].append(speed(root, student, cache, v, round_, args))
        tok_s = {v: statistics.median(r["tokens_per_s"] for rs in runs[v] for r in rs[1:]) for v in variants}
        e2e = {v: sum(r["tokens"] for rs in runs[v] for r in rs[1:])
               / sum(rs[-1]["elapsed_s"] - rs[0]["elapsed_s"] for rs in runs[v]) for v in variants}
        mem = {}
        for v in [*variants, "naive"]:
            out = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--memory-only", f"{root}:{v}"],
                                 capture_output=True, text=True, check=True).stdout
            mem[v] = json.loads(out.strip().splitlines()[-1])["peak_mib"]
    device = "cuda: " + torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({torch.get_num_threads()} threads)"
    print(f"\n{device}; V={args.vocab} d={args.hidden} layers={args.layers} B={args.batch_size} T={args.seq_len} "
          f"K={args.top_k} chunk={args.chunk_size}")
    print(f"{'variant':<10} {'step tok/s':>10} {'vs ce':>7} {'e2e tok/s':>10} {'vs ce':>7} {'step peak MiB':>14} "
          f"{'vs ce':>7}")
    for v in [*variants, "naive"]:
        speed_s = (f"{tok_s[v]:>10.0f} {tok_s[v] / tok_s['ce']:>7.3f} {e2e[v]:>10.0f} {e2e[v] / e2e['ce']:>7.3f}"
                   if v in tok_s else f"{'-':>10} {'-':>7} {'-':>10} {'-':>7}")
        print(f"{v:<10} {speed_s} {mem[v]:>14.0f} {mem[v] / mem['ce']:>7.3f}")
    result = {"device": device, "vocab": args.vocab, "hidden": args.hidden, "layers": args.layers,
              "batch_size": args.batch_size, "seq_len": args.seq_len, "top_k": args.top_k,
              "tokens_per_s": tok_s, "speed_vs_ce": {v: tok_s[v] / tok_s["ce"] for v in tok_s},
              "e2e_tokens_per_s": e2e, "e2e_vs_ce": {v: e2e[v] / e2e["ce"] for v in e2e},
              "step_peak_mib": mem, "memory_vs_ce": {v: mem[v] / mem["ce"] for v in mem},
              "fkl_memory_vs_naive": mem["fkl"] / mem["naive"]}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
