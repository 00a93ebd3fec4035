"""The reader's cost of checking every page's CRC32 (cache_format/reader.py): decoded tokens/s of the same shard
read with `page_checksum_verification` on and off, side by side, one core, alternating rounds, best of each.

    python scripts/bench_page_checksums.py [--rows 512] [--seq-len 512] [--k 64] [--vocab 151936] [--rounds 7]

The shard: random teacher rows (tests/helpers.random_row's rule: a random full distribution per position, its top-k
kept) written by ShardWriter with the default codec (topk-v3) and capture's row groups. The last line printed is
a JSON object.
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=512)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=151_936)
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()

    import pyarrow as pa
    import pyarrow.parquet as pq

    from cache_format import ShardWriter, TopkV3

    pa.set_cpu_count(1)
    pa.set_io_thread_count(1)
    rng = np.random.default_rng(0)
    codec = TopkV3(top_k=args.k, vocab_size=args.vocab)
    T, K = args.seq_len, args.k
    path = Path(tempfile.mkdtemp())
    w = ShardWriter(path, "shard-00000.parquet", codec, row_group_rows=64)
    for i in range(args.rows):
        logits = rng.normal(size=(T, 4 * K)) * 3                           # the top-4k of a wide distribution
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True)) - 0.1
        order = np.argsort(-logp, axis=-1)[:, :K]
        ids = rng.choice(args.vocab, size=4 * K, replace=False)[order].astype(np.int32)
        lps = np.take_along_axis(logp, order, -1).astype(np.float32)
        lps[-1] = -np.inf
        w.write({"row_index": i, "domain": "d", "input_ids": rng.integers(0, args.vocab, T).astype(np.int32),
                 "topk_ids": ids, "topk_logprobs": lps, "target_logprobs": lps[:, 0].copy()})
    info = w.close()
    rates = {True: [], False: []}
    for r in range(args.rounds):
        for verify in ((True, False) if r % 2 == 0 else (False, True)):
            t0, n = time.process_time(), 0
            pf = pq.ParquetFile(path / info.path, page_checksum_verification=verify)
            for g in range(pf.num_row_groups):
                for row in codec.decode(pf.read_row_group(g, use_threads=False), "x"):
                    n += len(row["input_ids"])
            rates[verify].append(n / (time.process_time() - t0))
    on, off = max(rates[True]), max(rates[False])
    summary = {"tokens": args.rows * T, "bytes_per_token": info.bytes / (args.rows * T), "vocab": args.vocab,
               "k": K, "checked_tokens_per_s": on, "unchecked_tokens_per_s": off, "ratio": on / off}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
