"""Conversation tokenisation speed: locating replies in the whole render (pipeline/chat.py) vs the prefix renders it
replaced (pipeline/chat.py at --baseline-rev), side by side in one run on the same conversations and tokenizer.

    python scripts/bench_chat_masks.py [--conversations 100000] [--tokenizer tests/real_tokenizers/llama3_1]
                                       [--baseline-rev 2b1389a] [--rounds 3] [--out FILE.json]

The corpus: synthetic chats of 1-3 exchanges (a system prompt in every third), replies of 10-80 words drawn from
the toy domains, on a published tokenizer and chat template whose renders are prefix-stable (Llama 3.1), so that
the baseline can mask them too. Both sides tokenize with the same tokenizer; the rounds alternate between them on
slices of the corpus and the best round of each is reported (tokens/s of the render + tokenisation + masks, the
work capture's tokenizer thread does per conversation). The masks of the two are compared on every conversation.
The last line printed is a JSON object with every number.
"""

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def conversations(n: int, seed: int = 0) -> list[list[dict]]:
    from tests.toy import WORDS
    rng = np.random.default_rng(seed)
    words = [w for ws in WORDS.values() for w in ws]

    def text(lo, hi):
        return " ".join(rng.choice(words, size=int(rng.integers(lo, hi))))

    out = []
    for i in range(n):
        msgs = [{"role": "system", "content": text(5, 20)}] if i % 3 == 0 else []
        for _ in range(int(rng.integers(1, 4))):
            msgs += [{"role": "user", "content": text(5, 40)}, {"role": "assistant", "content": text(10, 80)}]
        out.append(msgs)
    return out


def baseline_module(rev: str):
    """pipeline/chat.py as it was at `rev`, imported under another name."""
    source = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:pipeline/chat.py"], capture_output=True,
                            text=True, check=True).stdout
    path = Path(tempfile.mkdtemp()) / "chat_baseline.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("chat_baseline", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def timed(render, tokenizer, chats) -> tuple[float, int, list]:
    start, tokens, masks = time.perf_counter(), 0, []
    for i, msgs in enumerate(chats):
        ids, trained = render(tokenizer, msgs, "assistant", f"record {i}")
        tokens += len(ids)
        masks.append((ids, trained))
    return time.perf_counter() - start, tokens, masks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--conversations", type=int, default=100_000)
    ap.add_argument("--tokenizer", default=str(ROOT / "tests" / "real_tokenizers" / "llama3_1"))
    ap.add_argument("--baseline-rev", default="2b1389a")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out")
    args = ap.parse_args()

    from pipeline import chat
    from trainer.tokenizer import load_tokenizer
    tokenizer = load_tokenizer(args.tokenizer, args.tokenizer)
    baseline = baseline_module(args.baseline_rev)
    chats = conversations(args.conversations)
    slices = np.array_split(np.arange(len(chats)), args.rounds)
    result = {"located": {"seconds": 0.0, "tokens": 0}, "prefix renders": {"seconds": 0.0, "tokens": 0}}
    rates = {name: [] for name in result}
    differ = 0
    for r, part in enumerate(slices):
        part_chats = [chats[i] for i in part]
        order = [("located", chat.render), ("prefix renders", baseline.render)]
        for name, render in order if r % 2 == 0 else order[::-1]:
            seconds, tokens, masks = timed(render, tokenizer, part_chats)
            result[name]["seconds"] += seconds
            result[name]["tokens"] += tokens
            rates[name].append(tokens / seconds)
            if name == "located":
                located = masks
            else:
                prefix = masks
        differ += sum(a != b for a, b in zip(located, prefix))
        print(f"round {r}: " + ", ".join(f"{n} {rates[n][-1]:,.0f} tok/s" for n in rates), file=sys.stderr)
    for name in result:
        result[name]["tokens_per_s"] = result[name]["tokens"] / result[name]["seconds"]
        result[name]["best_round_tokens_per_s"] = max(rates[name])
    summary = {"conversations": len(chats), "tokenizer": args.tokenizer, "baseline_rev": args.baseline_rev,
               "masks_differ": differ, **result,
               "ratio_located_over_prefix": result["located"]["tokens_per_s"] / result["prefix renders"]["tokens_per_s"]}
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
