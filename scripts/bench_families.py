"""Capture speed per teacher family: vLLM's hidden-states output (head, log_softmax and top-k run by kdcache) vs
its prompt-logprobs output, side by side in one run on the same rows, plus the cache's bytes per token at each
family's real vocabulary size (the default codec at its default setting, on the hidden output's arrays).

    python scripts/bench_families.py [--families qwen2,gemma3,...] [--rows 64] [--seq-len 256] [--k 64]
                                     [--hidden 128] [--layers 2] [--dtype D] [--in-process] [--compile]
                                     [--out FILE.json]

Each family is tests/toy.py's tiny random model at its real vocabulary (FAMILIES: Qwen2 151,936 tied, Llama 3
128,256, Gemma 2 256,000 soft-capped, Gemma 3 262,144, Granite 49,155 scaled, Phi-3 200,064, Phi 51,200 with a
bias, GPT-NeoX 50,304 embed_out, Qwen3-MoE 151,936), logits of std 6. A tiny body exaggerates the share of the
per-logit work, which is what the two outputs differ in. The engines run as a capture runs them (engine core in
its own process) but eager (--compile: vLLM's default torch.compile / CUDA graphs, for GPU runs); --in-process
starts them in seconds, but vLLM then binds this process's threads, which slows kdcache's head. The last line
printed is a JSON object with every number.
"""

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_capture import best_of  # noqa: E402  (a sibling script)


def bytes_per_token(results, rows: list[np.ndarray], vocab: int, k: int, seq_len: int, root: Path) -> float:
    """The rows' cache bytes per token: the arrays written by capture's default codec and setting."""
    from cache_format import ShardWriter
    from pipeline.config import CaptureConfig
    from pipeline.corpus import DataSpec

    cfg = CaptureConfig(teacher="-", data=(DataSpec("d", "-"),), out="-", top_k=k, seq_len=seq_len)
    writer = ShardWriter(root, "bench.parquet", cfg.make_codec(vocab), row_group_rows=cfg.row_group_rows)
    for i, (row, (ids, lps, target)) in enumerate(zip(rows, results)):
        writer.write({"row_index": i, "domain": "d", "input_ids": row, "topk_ids": ids, "topk_logprobs": lps,
                      "target_logprobs": target, "doc_lengths": None})
    info = writer.close()
    return info.bytes / info.tokens


def bench_family(family: str, root: Path, tokenizer, args) -> dict:
    from pipeline.teachers import VLLMTeacher
    from tests.toy import FAMILIES, build_family

    path = root / family
    build_family(path, family, tokenizer, hidden=args.hidden, layers=args.layers)
    vocab = FAMILIES[family][2]
    rng = np.random.default_rng(0)
    rows = [rng.integers(0, len(tokenizer), args.seq_len).astype(np.int32) for _ in range(args.rows)]
    tokens = sum(map(len, rows))
    out = {"vocab": vocab}
    for output in ("hidden", "logprobs"):
        t0 = time.perf_counter()
        teacher = VLLMTeacher(str(path), args.k, args.seq_len, dtype=args.dtype, gpu_memory_utilization=args.memory,
                              output=output, enforce_eager=not args.compile)
        out[f"{output}_start_s"] = round(time.perf_counter() - t0, 1)
        results = []
        out[f"{output}_tok_s"] = round(tokens / best_of(lambda: results.append(teacher.topk(rows, args.k).rows()),
                                                         args.repeats))
        if output == "hidden":
            out["bytes_per_token"] = round(bytes_per_token(results[-1], rows, vocab, args.k, args.seq_len, root), 1)
            out["mean_top1_p"] = round(float(np.mean([np.exp(r[1][:-1, 0]).mean() for r in results[-1]])), 3)
            hidden_rows = results[-1]
        else:
            same = [np.array_equal(a[0][:-1, 0], b[0][:-1, 0]) for a, b in zip(hidden_rows, results[-1])]
            out["rows_with_equal_top1"] = f"{sum(same)}/{len(same)}"
        teacher.close()
    out["speedup"] = round(out["hidden_tok_s"] / out["logprobs_tok_s"], 2)
    return out


def main() -> None:
    from tests.toy import FAMILIES, build_tokenizer

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", default=",".join(FAMILIES))
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--memory", type=float, default=None, help="--gpu-memory-utilization (default: capture's)")
    ap.add_argument("--in-process", action="store_true", help="vLLM's engine core in this process")
    ap.add_argument("--compile", action="store_true", help="torch.compile / CUDA graphs (vLLM's default)")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on a GPU, float32 on CPU")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    args = ap.parse_args()
    if args.dtype is None:
        import torch
        args.dtype = "bfloat16" if torch.cuda.is_available() else "float32"
    if args.in_process:
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    report = {"setup": {k: v for k, v in vars(args).items() if k != "out"}, "families": {}}
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = build_tokenizer(Path(tmp) / "tokenizer")
        for family in args.families.split(","):
            report["families"][family] = bench_family(family, Path(tmp), tokenizer, args)
            print(family, report["families"][family], flush=True)
    print(f"{'family':10} {'V':>8} {'hidden tok/s':>13} {'logprobs tok/s':>15} {'speedup':>8} {'B/token':>8} "
          f"{'top-1 p':>8}")
    for family, r in report["families"].items():
        print(f"{family:10} {r['vocab']:>8} {r['hidden_tok_s']:>13} {r['logprobs_tok_s']:>15} {r['speedup']:>8} "
              f"{r['bytes_per_token']:>8} {r['mean_top1_p']:>8}")
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))
    print(json.dumps(report))


if __name__ == "__main__":
    main()
