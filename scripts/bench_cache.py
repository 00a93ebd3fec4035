"""Cache size and fidelity per codec setting, and reader speed (docs/benchmarks.md, "Cache size and fidelity").

    python scripts/bench_cache.py [--tokens 131072] [--teachers ref,4k,...] [--work build/bench-cache]

For each teacher, rows of its corpus go through the teacher once (HF, float32, full log_softmax); every setting
then encodes the same positions into a real Parquet shard as capture writes it (cache_format.ShardWriter at the
codec's zstd level, rows of 1,024 tokens, 64 rows = 65,536 tokens per row group) and decodes it:
    bytes/token  shard size on disk / tokens (input ids, targets, everything)
    KL           mean over positions of KL(full teacher || decoded cache), the decoded tail mass spread uniformly
                 over the ids not stored (order-free: any codec's entry order)
Settings: exact top-k at full precision (topk-v1: int32 + float32; k = 16, 32, 64, 128), topk-v2 (quantisation only,
its default, --kl-budget, --top-p), topk-v3 (no rule, --kl-scale sweep, its default at zstd 3 and 19, k = 128),
sampled targets (bytes only: their fidelity is statistical, see tests/trainer), and a DistillKit-like layout (bf16
logprobs, ids bit-packed to ceil(log2 V) bits, zstd) as the reference.
Teachers (no downloads; the 4k ones are built by this script when missing, minutes on CPU):
    ref          the reference teacher of scripts/train_reference_teacher.py (vocab 1024, trained on the structured
                 4-domain corpus) from build/bench-quality/{teacher,corpus}; rows from the end of each corpus file.
                 Confident: low entropy.
    4k           a tiny Llama (d=128, 2 layers) trained 800 steps on Python standard-library sources with a
                 4096-token BPE, measured on held-out stdlib files
    4k-early     the same after 120 steps: a high-entropy teacher (about 5.5 nats)
    X-in-N       teacher X embedded in an N-id vocabulary (its ids moved by a fixed random permutation, the other
                 ids at probability 0): its distributions with real-size id statistics (152k = 151,936, 262k = 262,144)
    150k         (not in the default list) vocab 151936, only 60 steps: little more than a unigram model
Reader and writer speed: each default setting's shard (and topk-v1's) with the rows repeated to --speed-tokens
tokens, written (encode + zstd, capture's writer thread) and read + decoded on one thread (process CPU time).
Prints a table, writes docs/cache_size_fidelity.png and build/bench-cache/results.json, and a final JSON line.
"""

import argparse
import json
import math
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

SEQ_LEN = 128
JOIN = 8                    # bench rows per cache row: rows of 1,024 tokens, as capture writes by default


def stdlib_texts(max_bytes: int, skip_bytes: int = 0) -> list[str]:
    """Python standard-library sources (sorted paths, deterministic): real code and English docstrings."""
    root = Path(sysconfig.get_paths()["stdlib"])
    texts, seen = [], 0
    for path in sorted(root.glob("*.py")) + sorted(root.glob("*/*.py")):
        if "test" in path.parts[-2] or path.name.startswith("test"):
            continue
        text = path.read_text(errors="replace")
        seen += len(text)
        if seen <= skip_bytes:
            continue
        texts.append(text)
        if seen >= skip_bytes + max_bytes:
            break
    return texts


def build_code_teacher(out: Path, vocab: int, model_vocab: int, steps: int, batch_size: int, seq_len: int = 128,
                       hidden: int = 128, layers: int = 2, threads: int = 1) -> dict:
    """A tiny Llama trained `steps` steps on stdlib sources with a byte-level BPE of up to `vocab` tokens; its
    output layer has `model_vocab` rows (>= the tokenizer's, like a padded real-model vocabulary)."""
    import torch
    from train_reference_teacher import EOS, build_tokenizer, llama_config, lr_at, pack
    from transformers import LlamaForCausalLM

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    texts = stdlib_texts(6 << 20)
    tok = build_tokenizer(texts, out, vocab)
    rows = pack(tok, texts, seq_len)                                       # (R, seq_len)
    model = LlamaForCausalLM(llama_config(max(model_vocab, len(tok)), hidden, layers, tok.convert_tokens_to_ids(EOS)))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, 3e-3, max(1, steps // 20), steps)
        x = torch.from_numpy(rows[rng.integers(0, len(rows), batch_size)])
        logits = model(input_ids=x).logits[:, :-1]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 50 == 0 or step == steps - 1:
            print(f"  [{out.name}] step {step}/{steps} loss {loss.item():.3f} {time.perf_counter() - t0:.0f}s",
                  flush=True)
    model.save_pretrained(out)
    info = {"tokenizer_vocab": len(tok), "model_vocab": model.config.vocab_size, "steps": steps,
            "final_loss": round(loss.item(), 3), "train_seconds": round(time.perf_counter() - t0, 1)}
    (out / "bench_teacher.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def corpus_rows(teacher: Path, which: str, tokens: int) -> np.ndarray:
    """(R, SEQ_LEN) token rows the teacher has not trained on."""
    from train_reference_teacher import pack
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(teacher)
    if which == "ref":
        corpus = ROOT / "build/bench-quality/corpus"
        per = tokens // 4
        rows = []
        for f in (corpus / f"{d}.jsonl" for d in ("arith", "code", "data", "prose")):   # the text domains
            texts = [json.loads(line)["text"] for line in f.read_text().splitlines()][-400:]
            rows.append(pack(tok, texts, SEQ_LEN)[: max(1, per // SEQ_LEN)])
        return np.concatenate(rows)
    return pack(tok, stdlib_texts(2 << 20, skip_bytes=6 << 20), SEQ_LEN)[: max(1, tokens // SEQ_LEN)]


def teacher_pass(teacher: Path, rows: np.ndarray, samples: int, batch: int = 8) -> dict:
    """Per position with a distribution (P = R * (SEQ_LEN-1)): sum p log p, the top-128 (ids, logprobs), the
    actual token's logprob, and `samples` draws (the sampled codec's input: ids sorted by count, log(c/N))."""
    import torch
    from transformers import AutoModelForCausalLM

    from pipeline.teachers import sample_targets

    model = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32).eval()
    gen = torch.Generator().manual_seed(0)
    out = {k: [] for k in ("negent", "ids", "lp", "target", "s_ids", "s_lp")}
    with torch.inference_mode():
        for b in range(0, len(rows), batch):
            x = torch.from_numpy(rows[b:b + batch])
            lp = torch.log_softmax(model(input_ids=x).logits[:, :-1].float(), -1).flatten(0, 1)   # (P_b, V)
            out["negent"].append((lp.exp() * lp).sum(-1))
            v, i = lp.topk(128, -1)
            out["lp"].append(v)
            out["ids"].append(i)
            out["target"].append(lp.gather(-1, x[:, 1:].reshape(-1, 1))[:, 0])
            s_ids, s_lp = sample_targets(lp, samples, gen)                                    # (P_b, N)
            out["s_ids"].append(s_ids)
            out["s_lp"].append(s_lp)
    res = {k: np.concatenate([np.asarray(a) for a in v]) for k, v in out.items()}
    res["vocab"] = model.config.vocab_size
    return res


def as_rows(t: dict, rows: np.ndarray, ids: np.ndarray, lp: np.ndarray) -> list[dict]:
    """Per-position (P, K) arrays -> cache rows as capture writes them: every JOIN rows of SEQ_LEN tokens joined
    into one row of JOIN * SEQ_LEN (the default --seq-len 1024), each part's last position empty."""
    K, L = ids.shape[1], SEQ_LEN - 1
    parts = []
    for r in range(len(rows)):
        sl = slice(r * L, (r + 1) * L)
        parts.append({"input_ids": rows[r].astype(np.int32),
                      "topk_ids": np.concatenate([ids[sl], np.zeros((1, K), np.int32)]).astype(np.int32),
                      "topk_logprobs": np.concatenate([lp[sl], np.full((1, K), -np.inf, np.float32)]),
                      "target_logprobs": np.append(t["target"][sl], np.float32(np.nan)).astype(np.float32)})
    return [{"row_index": i // JOIN, "domain": "bench",
             **{k: np.concatenate([p[k] for p in parts[i:i + JOIN]]) for k in parts[0]}}
            for i in range(0, len(parts), JOIN)]


def write_read(codec, rows: list[dict], path: Path, level: int | None = None) -> tuple[int, list[dict]]:
    """Encode into a real shard (64 rows per row group, as capture writes them), read it back through pyarrow +
    the codec: (bytes on disk, decoded rows). level None: the codec's zstd level."""
    import pyarrow.parquet as pq

    from cache_format import ShardWriter

    w = ShardWriter(path.parent, path.name, codec, row_group_rows=64, compression_level=level)
    for r in rows:
        w.write(r)
    info = w.close()
    pf = pq.ParquetFile(path)
    return info.bytes, [d for g in range(pf.num_row_groups) for d in codec.decode(pf.read_row_group(g), str(path))]


def mean_kl(t: dict, decoded: list[dict]) -> float:
    """Mean KL(full || decoded) over positions, the decoded tail spread uniformly over the ids not stored. Order-free:
    each position's decoded ids must be the first k of the teacher's top-128 as a set (any codec's order)."""
    ids = np.concatenate([d["topk_ids"] for d in decoded]).astype(np.int64)          # (P', K)
    dlp = np.concatenate([d["topk_logprobs"] for d in decoded]).astype(np.float64)
    live = np.isfinite(dlp[:, 0])                                                     # positions with a distribution
    ids, dlp = ids[live], dlp[live]                                                   # (P, K), in t's order
    K = ids.shape[1]
    valid = np.isfinite(dlp)
    k = valid.sum(1)                                                                  # (P,)
    top = np.where(np.arange(K) < k[:, None], t["ids"][:, :K].astype(np.int64), -1)     # the teacher's first k
    a, b = np.argsort(np.where(valid, ids, 1 << 40), 1), np.argsort(np.where(top >= 0, top, 1 << 40), 1)
    assert (np.where(valid, np.take_along_axis(ids, a, 1) == np.take_along_axis(top, b, 1), True)).all(), \
        "decoded ids are not the teacher's top-k"
    q = np.take_along_axis(dlp, a, 1)                                                  # decoded, by id
    p = np.where(valid, np.exp(np.take_along_axis(t["lp"][:, :K].astype(np.float64), b, 1)), 0.0)   # true, by id
    tail_true = np.clip(1.0 - p.sum(1), 0.0, None)
    tail_dec = np.clip(1.0 - np.exp(np.where(valid, q, -np.inf)).sum(1), 1e-30, None)
    cross = np.where(valid, p * np.where(valid, q, 0.0), 0.0).sum(1) + tail_true * np.log(tail_dec / (t["vocab"] - k))
    return float(np.mean(t["negent"] - cross))


def distillkit_like(t: dict, rows: np.ndarray, k: int, path: Path) -> tuple[int, float]:
    """bf16 logprobs + ids bit-packed to ceil(log2 V) bits per row, zstd Parquet; the tail spread uniformly."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    V, L = t["vocab"], SEQ_LEN - 1
    bits = max(1, math.ceil(math.log2(V)))
    lp32 = t["lp"][:, :k].astype(np.float32)
    bf16 = (lp32.view(np.uint32) + 0x8000 >> 16).astype(np.uint16)               # round to nearest bf16
    ids_bits = np.unpackbits(t["ids"][:, :k].astype(">u4").view(np.uint8).reshape(-1, 4), axis=1)[:, 32 - bits:]
    per_row = lambda a, n: [a[r * n:(r + 1) * n] for r in range(len(rows))]  # noqa
    table = pa.table({"input_ids": pa.array(list(rows.astype(np.int32))),
                      "ids": pa.array([np.packbits(x).tobytes() for x in per_row(ids_bits.reshape(-1, k * bits), L)],
                                      pa.binary()),
                      "logprobs": pa.array([x.tobytes() for x in per_row(bf16, L)], pa.binary())})
    pq.write_table(table, path, compression="zstd", compression_level=3)
    dlp = (bf16.astype(np.uint32) << 16).view(np.float32)
    rows_dec = [{"topk_ids": np.concatenate([t["ids"][r * L:(r + 1) * L, :k], np.zeros((1, k), np.int64)]),
                 "topk_logprobs": np.concatenate([dlp[r * L:(r + 1) * L], np.full((1, k), -np.inf)])}
                for r in range(len(rows))]
    return path.stat().st_size, mean_kl(t, rows_dec)


def shard_speed(codec, rows: list[dict], path: Path, tokens: int) -> tuple[float, float]:
    """(written, decoded) tokens/s, process CPU time on one thread, over a shard of about `tokens` tokens (the
    bench rows repeated, rows of 1,024 tokens, 64 per row group). Written: capture's writer thread's work,
    ShardWriter's encode + zstd + Parquet. Decoded: Parquet read + decode into (T, K) arrays, best of 3."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from cache_format import ShardWriter

    pa.set_cpu_count(1)
    pa.set_io_thread_count(1)
    reps = max(1, tokens // sum(len(r["input_ids"]) for r in rows))
    t0 = time.process_time()
    w = ShardWriter(path.parent, path.name, codec, row_group_rows=64)
    for i in range(reps * len(rows)):
        w.write({**rows[i % len(rows)], "row_index": i})
    w.close()
    written = reps * sum(len(r["input_ids"]) for r in rows) / (time.process_time() - t0)
    best = math.inf
    for _ in range(3):
        t0, n = time.process_time(), 0
        pf = pq.ParquetFile(path)
        for g in range(pf.num_row_groups):
            for d in codec.decode(pf.read_row_group(g, use_threads=False), str(path)):
                n += d["topk_ids"].shape[0]
        best = min(best, time.process_time() - t0)
    return written, n / best


def scatter_vocab(t: dict, rows: np.ndarray, vocab: int) -> tuple[dict, np.ndarray]:
    """The same teacher embedded in a `vocab`-id vocabulary: its ids moved by a fixed random permutation, the
    added ids with probability 0 (realistic distributions, real-size id statistics)."""
    perm = np.random.default_rng(0).permutation(vocab)[:t["vocab"]].astype(np.int32)
    return {**t, "ids": perm[t["ids"]], "s_ids": perm[t["s_ids"]], "vocab": vocab}, perm[rows]


def bench_teacher(name: str, teacher: Path, work: Path, tokens: int, speed_tokens: int,
                  scatter_to: int | None = None) -> dict:
    from cache_format import TopkV1, TopkV2, TopkV3
    from pipeline.config import DEFAULT_KL_SCALE

    S2, S3 = DEFAULT_KL_SCALE["v2"], DEFAULT_KL_SCALE["v3"]
    rows = corpus_rows(teacher, name.split("-in-")[0].split("-")[0], tokens)
    t0 = time.perf_counter()
    t = teacher_pass(teacher, rows, samples=50)
    if scatter_to:
        t, rows = scatter_vocab(t, rows, scatter_to)
    V, n_tok = t["vocab"], rows.size
    entropy = float(-t["negent"].mean())
    print(f"[{name}] vocab {V}, {n_tok} tokens, teacher pass {time.perf_counter() - t0:.0f}s; mean entropy "
          f"{entropy:.2f} nats, top-1 mass {np.exp(t['lp'][:, 0]).mean():.3f}", flush=True)
    d = work / name
    d.mkdir(parents=True, exist_ok=True)
    results = []

    def run(label: str, kind: str, codec, k: int, level: int | None = None, **extra):
        ids, lp = (t["s_ids"], t["s_lp"]) if kind == "sampled" else (t["ids"][:, :k], t["lp"][:, :k])
        size, dec = write_read(codec, as_rows(t, rows, ids.astype(np.int32), lp), d / f"{label}.parquet", level)
        kl = None if kind == "sampled" else mean_kl(t, dec)
        kept = float(np.mean(np.concatenate([np.isfinite(x["topk_logprobs"]).sum(1) for x in dec])[
            np.concatenate([np.isfinite(x["topk_logprobs"][:, 0]) for x in dec])]))
        results.append({"setting": label, "kind": kind, "k": k, "bytes_per_token": size / n_tok, "kl": kl,
                        "mean_kept": kept, **extra})
        print(f"  {label:<28} {size / n_tok:8.1f} B/token  KL {kl if kl is None else f'{kl:.5f}'}  "
              f"kept {kept:.1f}", flush=True)

    for k in (16, 32, 64, 128):
        run(f"exact-top{k}", "exact", TopkV1(top_k=k), k)
    run("v2-top64", "v2", TopkV2(top_k=64, vocab_size=V), 64)
    run(f"v2-top64-scale{S2:g}", "v2", TopkV2(top_k=64, vocab_size=V, kl_scale=S2), 64, kl_scale=S2)
    run("v2-top64-kl0.001", "v2", TopkV2(top_k=64, vocab_size=V, kl_budget=1e-3), 64, kl_budget=1e-3)
    run("v2-top64-p0.99", "v2", TopkV2(top_k=64, vocab_size=V, top_p=0.99), 64, top_p=0.99)
    run("v3-top64", "v3", TopkV3(top_k=64, vocab_size=V), 64)
    for c in (0.005, S3, 0.02, 0.03, 0.05):
        run(f"v3-top64-scale{c:g}", "v3", TopkV3(top_k=64, vocab_size=V, kl_scale=c), 64, kl_scale=c)
    run(f"v3-top64-scale{S3:g}-zstd3", "v3", TopkV3(top_k=64, vocab_size=V, kl_scale=S3), 64, level=3, kl_scale=S3,
        zstd_level=3)
    run(f"v3-top64-scale{S3:g}-zstd19", "v3", TopkV3(top_k=64, vocab_size=V, kl_scale=S3), 64, level=19,
        kl_scale=S3, zstd_level=19)
    for c in (S3, 0.05):
        run(f"v3-top128-scale{c:g}", "v3", TopkV3(top_k=128, vocab_size=V, kl_scale=c), 128, kl_scale=c)
    run("v2-sampled50", "sampled", TopkV2(top_k=50, vocab_size=V, targets="sampled", samples=50), 50, samples=50)
    for k in (50, 64, 128):
        size, kl = distillkit_like(t, rows, k, d / f"distillkit-{k}.parquet")
        results.append({"setting": f"distillkit-like-{k}", "kind": "distillkit", "k": k,
                        "bytes_per_token": size / n_tok, "kl": kl, "mean_kept": k})
        print(f"  {'distillkit-like-' + str(k):<28} {size / n_tok:8.1f} B/token  KL {kl:.5f}", flush=True)
    exact64 = next(r["kl"] for r in results if r["setting"] == "exact-top64")
    pick = lambda label: next(r for r in results if r["setting"] == label)  # noqa: E731
    default, v2 = pick(f"v3-top64-scale{S3:g}"), pick(f"v2-top64-scale{S2:g}")
    out = {"teacher": name, "vocab": V, "tokens": n_tok, "entropy_nats": entropy, "results": results,
           "default": {"codec": "topk-v3", "bytes_per_token": default["bytes_per_token"], "kl": default["kl"],
                       "kl_ratio_vs_exact64": default["kl"] / exact64},
           "v2_default": {"bytes_per_token": v2["bytes_per_token"], "kl_ratio_vs_exact64": v2["kl"] / exact64}}
    if speed_tokens:
        lp64 = as_rows(t, rows, t["ids"][:, :64].astype(np.int32), t["lp"][:, :64])
        speeds = {f"topk-v3 default (--kl-scale {S3:g})": shard_speed(
                      TopkV3(top_k=64, vocab_size=V, kl_scale=S3), lp64, d / "speed-v3.parquet", speed_tokens),
                  f"topk-v2 default (--kl-scale {S2:g})": shard_speed(
                      TopkV2(top_k=64, vocab_size=V, kl_scale=S2), lp64, d / "speed-v2.parquet", speed_tokens),
                  "topk-v1 top64": shard_speed(TopkV1(top_k=64), lp64, d / "speed-v1.parquet", speed_tokens)}
        out["writer_tokens_per_s"] = {k: w for k, (w, _) in speeds.items()}
        out["reader_tokens_per_s"] = {k: r for k, (_, r) in speeds.items()}
        for what in ("writer", "reader"):
            print(f"  {what}: {json.dumps({k: round(v) for k, v in out[f'{what}_tokens_per_s'].items()})}",
                  flush=True)
    return out


def plot(all_results: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = 2
    rows = -(-len(all_results) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6.5 * cols, 4.8 * rows), squeeze=False)
    for ax, res in zip(axes.ravel(), all_results):
        for kind, style in (("exact", "o-"), ("v2", "s"), ("v3", "D"), ("distillkit", "^")):
            pts = [(r["bytes_per_token"], r["kl"]) for r in res["results"] if r["kind"] == kind and r["kl"]]
            if pts:
                x, y = zip(*sorted(pts))
                ax.plot(x, y, style, label={"exact": "exact top-k 16/32/64/128 (int32 + fp32)",
                                             "v2": "topk-v2 settings", "v3": "topk-v3 settings",
                                             "distillkit": "DistillKit-like (bf16)"}[kind])
        exact64 = next(r["kl"] for r in res["results"] if r["setting"] == "exact-top64")
        ax.axhline(1.05 * exact64, color="grey", ls="--", lw=0.8, label="1.05 x exact top-64")
        ax.axvline(40, color="grey", ls=":", lw=0.8, label="40 B/token")
        d, v2 = res["default"], next(r for r in res["results"] if r["setting"].startswith("v2-top64-scale"))
        ax.plot([v2["bytes_per_token"]], [v2["kl"]], "k*", ms=11, label="topk-v2 default")
        ax.plot([d["bytes_per_token"]], [d["kl"]], "r*", ms=14, label="topk-v3 default (--top-k 64)")
        ax.set(xscale="log", yscale="log", xlabel="bytes / token on disk", ylabel="mean KL(teacher || cache), nats",
               title=f"{res['teacher']} teacher, vocab {res['vocab']}, entropy {res['entropy_nats']:.2f} nats")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    for ax in axes.ravel()[len(all_results):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teachers", default="ref,ref-in-4k,ref-in-152k,4k,4k-in-152k,4k-in-262k,4k-early,4k-early-in-152k")
    p.add_argument("--tokens", type=int, default=131072, help="tokens per teacher (150k: a quarter)")
    p.add_argument("--speed-tokens", type=int, default=262144)
    p.add_argument("--work", default=str(ROOT / "build/bench-cache"))
    p.add_argument("--plot", default=str(ROOT / "docs/cache_size_fidelity.png"))
    args = p.parse_args()
    import torch
    torch.set_num_threads(1)
    work = Path(args.work)
    ref, code, early = ((ROOT / "build/bench-quality/teacher", None), (work / "teacher-4k", (4096, 4096, 800, 16)),
                        (work / "teacher-4k-early", (4096, 4096, 120, 16)))
    teachers = {"ref": (*ref, None), "ref-in-4k": (*ref, 4096), "ref-in-152k": (*ref, 151936),
                "4k": (*code, None), "4k-in-152k": (*code, 151936), "4k-in-262k": (*code, 262144),
                "4k-early": (*early, None), "4k-early-in-152k": (*early, 151936),
                "150k": (work / "teacher-150k", (151936, 151936, 60, 4), None)}
    all_results = []
    for name in args.teachers.split(","):
        path, build, scatter_to = teachers[name]
        if not (path / "config.json").exists():
            if build is None:
                sys.exit(f"{path}: missing; run scripts/train_reference_teacher.py --out build/bench-quality")
            build_code_teacher(path, *build)
        tokens = args.tokens // 4 if name == "150k" else args.tokens
        all_results.append(bench_teacher(name, path, work, tokens, args.speed_tokens, scatter_to))
    plot(all_results, Path(args.plot))
    (work / "results.json").write_text(json.dumps(all_results, indent=2) + "\n")
    print(json.dumps({"bench": "cache", "teachers": {r["teacher"]: {
        "vocab": r["vocab"], "entropy_nats": r["entropy_nats"], **r["default"], "v2_default": r["v2_default"],
        "reader_tokens_per_s": r.get("reader_tokens_per_s"), "writer_tokens_per_s": r.get("writer_tokens_per_s")}
        for r in all_results}}))


if __name__ == "__main__":
    main()
