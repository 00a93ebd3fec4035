"""Capture efficiency: each engine's capture tokens/s (top-k arrays out) ÷ its own bare forward tokens/s over the
same rows, measured side by side in one run, plus `kdcache capture` end to end (tokenisation, engine, writing).

    python scripts/bench_capture.py [--engines hf,vllm] [--rows 64] [--seq-len 256] [--k 64] [--vocab 2048]
                                    [--hidden 128] [--layers 2] [--e2e-docs 12000]

The teacher is a random Llama (default 2 layers, d=128, V=2048, like ../shared/research/vllm.md's measurements; the
smaller it is, the larger the share of the per-logit work that capture adds). Bare forward: HF, the model's
logits at every position; vLLM, `generate` with max_tokens=1 (a prefill that runs the head on the last position
only), for the hidden-states output `encode` (the prefill, no head) and `encode` + the head's matmul at every
position (the least any capture must compute: logits everywhere). vLLM is measured with both outputs
(--vllm-output logprobs and hidden), each against its own engine's bare forward. The last line printed is a JSON
object with every number.
"""

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def best_of(fn, repeats: int) -> float:
    """Fastest wall time of `repeats` calls (after one warm-up call)."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def bench_hf(path: str, rows: list[np.ndarray], k: int, batch: int, repeats: int) -> dict:
    from pipeline.teachers import HFTeacher

    teacher = HFTeacher(path, dtype="float32")
    batches = [rows[i:i + batch] for i in range(0, len(rows), batch)]

    @torch.inference_mode()
    def bare():
        for b in batches:
            teacher.model(input_ids=torch.from_numpy(np.stack(b).astype(np.int64))).logits.sum()

    def capture():
        for b in batches:
            teacher.topk(b, k).rows()

    tokens = sum(map(len, rows))
    out = {"bare_tok_s": tokens / best_of(bare, repeats), "capture_tok_s": tokens / best_of(capture, repeats)}
    teacher.close()
    return out


def bench_vllm(path: str, rows: list[np.ndarray], k: int, seq_len: int, repeats: int) -> dict:
    from vllm import PoolingParams, SamplingParams
    from vllm.inputs import TokensPrompt

    from pipeline.teachers import VLLMTeacher, apply_head

    prompts = [TokensPrompt(prompt_token_ids=r.tolist()) for r in rows]
    tokens = sum(map(len, rows))
    teacher = VLLMTeacher(path, k, seq_len, dtype="float32", gpu_memory_utilization=0.2, output="logprobs")
    bare = SamplingParams(max_tokens=1, detokenize=False)
    out = {
        "bare_tok_s": tokens / best_of(lambda: teacher.llm.generate(prompts, bare, use_tqdm=False), repeats),
        "logprobs_capture_tok_s": tokens / best_of(lambda: teacher.topk(rows, k).rows(), repeats),
        "dict_logprobs_tok_s": tokens / best_of(lambda: teacher.llm.generate(
            prompts, SamplingParams(max_tokens=1, prompt_logprobs=k, detokenize=False), use_tqdm=False), repeats),
    }
    teacher.close()
    teacher = VLLMTeacher(path, k, seq_len, dtype="float32", gpu_memory_utilization=0.2, output="hidden")
    params = PoolingParams(use_activation=False)
    out["encode_tok_s"] = tokens / best_of(
        lambda: teacher.llm.encode(prompts, params, pooling_task="token_embed", use_tqdm=False), repeats)
    out["capture_tok_s"] = tokens / best_of(lambda: teacher.topk(rows, k).rows(), repeats)

    @torch.inference_mode()
    def forward_with_head():   # the prefill plus the head at every position (what capture needs), chunked like it
        hidden, _ = teacher.hidden_states(rows)                                    # (N, d)
        step = max(1, (1 << 22) // len(teacher.head_weight))
        for start in range(0, len(hidden), step):
            apply_head(hidden[start:start + step], teacher.head, teacher.head_weight, teacher.head_bias).sum()

    out["forward_tok_s"] = tokens / best_of(forward_with_head, repeats)
    teacher.close()
    out["logprobs_ratio"] = round(out["logprobs_capture_tok_s"] / out["bare_tok_s"], 3)
    out["hidden_ratio_to_encode"] = round(out["capture_tok_s"] / out["encode_tok_s"], 3)
    out["hidden_ratio_to_forward"] = round(out["capture_tok_s"] / out["forward_tok_s"], 3)
    return out


def end_to_end(engine: str, teacher: str, corpus: Path, out: Path, k: int, seq_len: int) -> dict:
    """`kdcache capture` as a user runs it; tokens/s from its own log line (engine start excluded)."""
    cmd = [sys.executable, "-m", "pipeline", "capture", "--teacher", teacher, "--data", f"toy={corpus}", "--out",
           str(out), "--backend", engine, "--top-k", str(k), "--seq-len", str(seq_len), "--dtype", "float32",
           "--val-fraction", "0", "--gpu-memory-utilization", "0.2"]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(r.stderr[-2000:])
    m = re.search(r"captured (\d+) tokens in ([\d.]+)s \((\d+) tokens/s", r.stderr)
    return {"e2e_tok_s": int(m.group(3)), "e2e_tokens": int(m.group(1)), "e2e_wall_s_with_startup": round(wall, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--engines", default="hf,vllm")
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=16, help="HF rows per forward")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--e2e-docs", type=int, default=12000, help="documents in the end-to-end corpus (~37 tokens each)")
    args = ap.parse_args()

    from tests.toy import build_llama, build_tokenizer, domain_texts

    tmp = Path(tempfile.mkdtemp(prefix="bench_capture_"))
    tok = build_tokenizer(tmp / "teacher")
    build_llama(tmp / "teacher", args.vocab, hidden=args.hidden, layers=args.layers, seed=0,
                eos_id=tok.eos_token_id)
    rng = np.random.default_rng(0)
    rows = [rng.integers(0, args.vocab, size=args.seq_len).astype(np.int32) for _ in range(args.rows)]
    corpus = tmp / "toy.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in domain_texts("prose", args.e2e_docs, seed=1)))

    result = {"rows": args.rows, "seq_len": args.seq_len, "k": args.k, "vocab": args.vocab,
              "teacher": f"random Llama {args.layers} layers d={args.hidden}", "threads": torch.get_num_threads()}
    for engine in args.engines.split(","):
        r = bench_hf(str(tmp / "teacher"), rows, args.k, args.batch, args.repeats) if engine == "hf" else \
            bench_vllm(str(tmp / "teacher"), rows, args.k, args.seq_len, args.repeats)
        r.update(end_to_end(engine, str(tmp / "teacher"), corpus, tmp / f"cache_{engine}", args.k, args.seq_len))
        r["ratio"] = round(r["capture_tok_s"] / r["bare_tok_s"], 3)
        r["e2e_ratio"] = round(r["e2e_tok_s"] / r["bare_tok_s"], 3)
        result[engine] = {key: round(v) if key.endswith("tok_s") else v for key, v in r.items()}
        print(f"{engine:5s} bare {r['bare_tok_s']:>10.0f} tok/s   capture {r['capture_tok_s']:>10.0f} tok/s   "
              f"ratio {r['ratio']:.3f}   e2e {r['e2e_tok_s']:>8d} tok/s ({r['e2e_ratio']:.3f})", file=sys.stderr)
        if engine == "vllm":
            print(f"      --vllm-output logprobs {r['logprobs_capture_tok_s']:.0f} tok/s ({r['logprobs_ratio']:.3f}); "
                  f"hidden vs its own encode {r['encode_tok_s']:.0f} tok/s: {r['hidden_ratio_to_encode']:.3f}, vs "
                  f"encode + head {r['forward_tok_s']:.0f} tok/s: {r['hidden_ratio_to_forward']:.3f}",
                  file=sys.stderr)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
