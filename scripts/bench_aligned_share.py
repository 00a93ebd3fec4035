"""Cross-tokenizer alignment between published tokenizers: the share of a student's trained positions that align
exactly with a teacher token (so the teacher's top-k is their KD target; trainer/cross_tokenizer.py), per
teacher -> student pair and domain.

    python scripts/bench_aligned_share.py [--pairs llama3_1:qwen3,qwen3:gemma3,...] [--rows 40] [--seq-len 512]
                                          [--out FILE.json]

Tokenizers: the published files under tests/real_tokenizers (`make setup` fetches them). Text from this machine:
prose = the GPL-3 and Apache-2.0 licence texts (/usr/share/common-licenses), code = Python standard-library
sources, chat = conversations whose replies are standard-library docstrings, rendered with the teacher's chat template
(replies trained, as capture's --train-on assistant). Each row is seq-len teacher tokens, turned into the
student's row exactly as `train --cross-tokenizer` does (StudentRows). The last line printed is a JSON object.
"""

import argparse
import functools
import inspect
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PAIRS = "llama3_1:qwen3,qwen3:gemma3,deepseek_v3:llama3_1,gemma3:llama3_1,qwen3:llama3_1,gptoss:qwen3,llama2:gemma3"
MODULES = ("json.decoder", "textwrap", "argparse", "collections", "pathlib", "functools", "csv", "heapq", "shutil",
           "tempfile", "difflib", "statistics", "fractions", "string", "calendar", "glob", "fnmatch", "bisect")


def domain_texts() -> dict[str, list[str]]:
    import importlib
    modules = [importlib.import_module(m) for m in MODULES]
    prose = [Path("/usr/share/common-licenses", name).read_text() for name in ("GPL-3", "Apache-2.0")]
    code = [inspect.getsource(m) for m in modules]
    docs = [inspect.getdoc(obj) for m in modules for _, obj in inspect.getmembers(m)
            if (inspect.isfunction(obj) or inspect.isclass(obj)) and len(inspect.getdoc(obj) or "") > 200]
    return {"prose": prose, "code": code, "chat": docs}


@functools.cache
def tokenizer(family: str):
    from trainer.tokenizer import load_tokenizer
    return load_tokenizer(ROOT / "tests" / "real_tokenizers" / family, family)


def teacher_rows(family: str, texts: list[str], domain: str, rows: int, seq_len: int) -> list[dict]:
    """Rows of seq_len teacher tokens: text documents joined (all trained), or conversations rendered with the
    teacher's template (replies trained)."""
    from pipeline.chat import render
    tok = tokenizer(family)
    ids, trained = [], []
    for i, text in enumerate(texts):
        if domain == "chat":
            msgs = [{"role": "user", "content": f"Explain this, please (item {i})."},
                    {"role": "assistant", "content": text}]
            a, b = render(tok, msgs, "assistant", f"chat {i}")
        else:
            a = tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            b = [True] * len(a)
        ids += a
        trained += b
        if len(ids) >= rows * seq_len:
            break
    out = []
    for r in range(min(rows, len(ids) // seq_len)):
        row_ids = np.asarray(ids[r * seq_len:(r + 1) * seq_len], np.int64)
        supervised = np.append(np.asarray(trained[r * seq_len + 1:(r + 1) * seq_len], bool), False)
        out.append({"row_index": r, "domain": domain, "input_ids": row_ids, "supervised": supervised,
                    "position_ids": np.arange(seq_len), "topk_ids": np.zeros((seq_len, 1), np.int64),
                    "topk_logprobs": np.where(supervised, 0.0, -np.inf)[:, None].astype(np.float32),
                    "target_logprobs": np.where(supervised, 0.0, np.nan).astype(np.float32)})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", default=PAIRS)
    ap.add_argument("--rows", type=int, default=40)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--out")
    args = ap.parse_args()

    from cache_format.fingerprint import named_ids, tokenizer_json
    from cache_format.token_bytes import byte_exact_table
    from trainer.cross_tokenizer import StudentRows

    texts = domain_texts()
    results = []
    for pair in args.pairs.split(","):
        t_name, s_name = pair.split(":")
        teacher, student = tokenizer(t_name), tokenizer(s_name)
        t_table = byte_exact_table(teacher, tokenizer_json(teacher))
        s_table = byte_exact_table(student, tokenizer_json(student))
        convert = StudentRows(t_table, named_ids(teacher), student, max_len=10 ** 9, student=s_table)
        entry = {"teacher": t_name, "student": s_name}
        for domain, docs in texts.items():
            if domain == "chat" and not teacher.chat_template:
                continue
            aligned = trained_n = t_tokens = s_tokens = 0
            for row in teacher_rows(t_name, docs, domain, args.rows, args.seq_len):
                s = convert(row)
                aligned, trained_n = aligned + int(s["supervised"].sum()), trained_n + int(s["trained"].sum())
                t_tokens, s_tokens = t_tokens + int(row["supervised"].sum()), s_tokens + len(s["input_ids"])
            entry[domain] = {"aligned_share": aligned / max(trained_n, 1), "student_trained": trained_n,
                             "teacher_trained": t_tokens, "student_tokens": s_tokens}
        results.append(entry)
        print(f"{t_name:>12} -> {s_name:<9} " + "  ".join(
            f"{d} {entry[d]['aligned_share']:.3f}" for d in texts if d in entry), file=sys.stderr)
    summary = {"rows": args.rows, "seq_len": args.seq_len, "pairs": results}
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
