"""An instruction corpus with open-ended replies from this machine's own documentation, an SFT teacher on it, a student.

AdaKD's paper distils an SFT teacher whose replies carry real entropy (Dolly-style instructions, sampled replies).
The reference corpus' chat replies are determined by the question (its teacher is nearly one-hot on them); this
script builds the opposite case, from text already on a Debian host (no download, nothing of the team's data):

    man      "What does the `tar` command do?"  -> the man page's NAME line and first DESCRIPTION sentences
             (/usr/share/man/man1; gcloud's 16k generated pages capped at GCLOUD of them)
    python   "What does `json.dumps` do in Python?" -> the first paragraph of its docstring (the stdlib sources
             under /usr/lib/python3.X, parsed with ast: nothing is imported)
    debian   "What is the Debian package `zstd` for?" -> its Description (/var/lib/dpkg/status)

Replies are capped at REPLY_WORDS words (cut at a sentence end where one is near). One exchange per conversation,
a system line on 30 %. Files written into DIR:

    DIR/corpus/instruct.jsonl   {"messages": [...], "source": "man"|"python"|"debian"} per line, shuffled
    DIR/tokenizer/              byte-level BPE (--vocab) trained on the train split's texts, the reference chat
                                template (scripts/train_reference_teacher.py: `<|role|>content<|end|>`)
    DIR/teacher/                LlamaForCausalLM SFT-trained on the train split only (the split `kdcache capture
                                --val-fraction F --split-seed 0` gives: pipeline.corpus.split_of of the record),
                                loss on the reply tokens only, each conversation on its own (right-padded batches)
    DIR/student/                a smaller LlamaForCausalLM, random init, same tokenizer
    DIR/teacher_report.json     reply CE and the mean entropy of the teacher's next-token distribution on reply
                                tokens, train and val split; examples of its greedy replies

    python scripts/train_instruct_teacher.py --out DIR [--epochs 6] [--vocab 2048] [--val-fraction 0.1]
"""

import argparse
import ast
import gzip
import json
import math
import re
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
from pipeline.corpus import record_key, split_of  # noqa: E402
from train_reference_teacher import (END, EOS, adamw, build_tokenizer, llama_config, lr_at, render_chat,  # noqa: E402
                                     save_student, save_tokenizer)

DOMAIN = "instruct"
REPLY_WORDS = 40
GCLOUD = 1500                      # of the ~16,600 generated gcloud pages (they would drown the rest)
PYTHON_DOCS = 3500
SYSTEMS = ("You are a helpful assistant.", "Answer briefly.", "You explain software to users.",
           "Be concise and accurate.")
QUESTIONS = {
    "man": ("What does the `{x}` command do?", "Explain what {x} does.", "What is {x} used for?",
            "Describe the command {x}."),
    "python": ("What does `{x}` do in Python?", "Explain the Python function {x}.", "What is {x} for?",
               "Describe {x} from the Python standard library."),
    "debian": ("What is the Debian package `{x}` for?", "What does the {x} package provide?",
               "Describe the package {x}."),
}


def cap_words(text: str, limit: int = REPLY_WORDS) -> str:
    """At most `limit` words, cut after the last sentence end in the second half if there is one."""
    words = " ".join(text.split()).split(" ")
    if len(words) <= limit:
        return " ".join(words)
    cut = " ".join(words[:limit])
    end = max(cut.rfind(". "), cut.rfind(".\u0020"))
    return cut[:end + 1] if end > len(cut) // 2 else cut.rstrip(",;:") + "."


def _groff_text(src: str) -> str:
    """The running text of a groff fragment: font escapes and macros dropped, .B/.I arguments kept."""
    out = []
    for line in src.splitlines():
        if line.startswith((".B ", ".I ", ".BR ", ".IR ", ".BI ", ".IB ", ".RB ", ".RI ")):
            line = line.split(" ", 1)[1].replace('"', "")
        elif line.startswith((".", "'")):
            continue
        out.append(line)
    text = " ".join(out)
    text = re.sub(r"\\f(\[[^\]]*\]|\(..|.)", "", text)           # fonts: \fB \fR \f(CW \f[B]
    text = re.sub(r"\\\(em|\\\(en", "-", text).replace("\\-", "-").replace("\\&", "").replace("\\e", "\\")
    text = re.sub(r"\\\(..|\\\*\(..|\\\*.|\\[|^~ ]", "", text)  # other named characters and spacing escapes
    return " ".join(text.split())


def man_pages(root: Path = Path("/usr/share/man/man1")) -> list[tuple[str, str]]:
    """(command, description) of man1 pages with a NAME line; the reply is the NAME's description plus the first
    two sentences of DESCRIPTION."""
    section = lambda name, t: re.search(rf'^\.S[Hh]\s+"?{name}"?\s*\n(.*?)(?=^\.S[Hh]|\Z)', t, re.M | re.S)  # noqa
    pages, gcloud = [], 0
    for path in sorted(root.glob("*.gz")):
        if path.name.startswith("gcloud"):
            gcloud += 1
            if gcloud % 11:                                         # an even sample of ~1/11 of them
                continue
        try:
            t = gzip.open(path, "rt", errors="replace").read()
        except (OSError, EOFError):
            continue
        name = section("NAME", t)
        if not name or " - " not in (line := _groff_text(name.group(1))):
            continue
        command, what = (s.strip() for s in line.split(" - ", 1))
        if not command or not what or len(command) > 60:
            continue
        what = re.sub(r"^\((ALPHA|BETA)\)\s*", "", what)
        reply = what[0].upper() + what[1:].rstrip(".") + "."
        if (desc := section("DESCRIPTION", t)) and (body := _groff_text(desc.group(1))):
            reply += " " + " ".join(re.split(r"(?<=\.)\s+", re.sub(r"\((ALPHA|BETA)\)\s*", "", body))[:2])
        pages.append((command.split(",")[0].strip(), cap_words(reply)))
    return pages


def python_docs(root: Path = Path(sys.base_prefix) / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}"):
    """(module.name, first docstring paragraph) of public top-level functions and classes of the stdlib."""
    docs = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if any(p in ("test", "tests", "idlelib", "lib2to3", "site-packages", "dist-packages", "__pycache__")
               or p.startswith("_") for p in rel.parts[:-1]) or rel.name.startswith("_"):
            continue
        try:
            tree = ast.parse(path.read_text(errors="replace"))
        except (SyntaxError, ValueError):
            continue
        module = ".".join(rel.with_suffix("").parts)
        public = lambda body: [n for n in body if isinstance(n, (ast.FunctionDef, ast.ClassDef))  # noqa: E731
                               and not n.name.startswith("_")]
        for node in public(tree.body):
            members = [(f"{node.name}.{m.name}", m) for m in public(node.body)] if isinstance(node, ast.ClassDef) \
                else []
            for name, n in [(node.name, node), *members]:
                para = " ".join((ast.get_docstring(n) or "").split("\n\n")[0].split())
                if len(para.split()) >= 4 and not para.startswith((n.name + "(", ">>>")):
                    docs.append((f"{module}.{name}", cap_words(para)))
    return docs


def debian_packages(status: Path = Path("/var/lib/dpkg/status")) -> list[tuple[str, str]]:
    """(package, short description + the long description's first paragraph)."""
    out = []
    for block in status.read_text(errors="replace").split("\n\n"):
        name = re.search(r"^Package: (\S+)", block, re.M)
        desc = re.search(r"^Description: (.*?)(?=^\S|\Z)", block, re.M | re.S)
        if not name or not desc:
            continue
        short, *long = desc.group(1).split("\n")
        long = [ln.strip() for ln in long]
        para = " ".join(long[:long.index(".")] if "." in long else long)        # up to the first " ." line
        out.append((name.group(1), cap_words(short[0].upper() + short[1:].rstrip(".") + ". " + para)))
    return out


def build_corpus(seed: int) -> list[dict]:
    """Every source's (subject, reply) as a one-exchange conversation, shuffled in `seed`."""
    rng = np.random.default_rng(seed)
    pythons = python_docs()
    pythons = [pythons[i] for i in sorted(rng.choice(len(pythons), min(PYTHON_DOCS, len(pythons)), replace=False))]
    records = []
    for source, items in (("man", man_pages()), ("python", pythons), ("debian", debian_packages())):
        for subject, reply in items:
            question = QUESTIONS[source][int(rng.integers(len(QUESTIONS[source])))].format(x=subject)
            messages = [{"role": "system", "content": SYSTEMS[int(rng.integers(len(SYSTEMS)))]}] \
                if rng.random() < 0.3 else []
            messages += [{"role": "user", "content": question}, {"role": "assistant", "content": reply}]
            records.append({"messages": messages, "source": source})
    return [records[i] for i in rng.permutation(len(records))]


def padded(ids: list[list[int]], masks: list[list[bool]], pad_id: int):
    """(x (B, L) int64, supervised (B, L-1) bool: the positions whose next token is a reply token)."""
    import torch
    L = max(len(x) for x in ids)
    x = torch.tensor([x + [pad_id] * (L - len(x)) for x in ids])
    sup = torch.tensor([m[1:] + [False] * (L - len(m)) for m in masks])
    return x, sup


def reply_stats(model, ids, masks, pad_id: int, batch_size: int = 64) -> dict:
    """Reply CE and the mean entropy of the model's next-token distribution at reply positions (nats/token)."""
    import torch
    model.eval()
    ce = ent = n = 0.0
    with torch.inference_mode():
        for i in range(0, len(ids), batch_size):
            x, sup = padded(ids[i:i + batch_size], masks[i:i + batch_size], pad_id)
            lq = torch.log_softmax(model(input_ids=x).logits[:, :-1].float(), -1)      # (B, L-1, V)
            nll = -lq.gather(-1, x[:, 1:, None])[..., 0]                                 # (B, L-1)
            h = -(lq.exp() * lq).sum(-1)                                                 # (B, L-1)
            ce, ent, n = ce + float(nll[sup].sum()), ent + float(h[sup].sum()), n + int(sup.sum())
    model.train()
    return {"reply_ce": round(ce / max(n, 1), 4), "reply_entropy": round(ent / max(n, 1), 4), "tokens": int(n)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--val-fraction", type=float, default=0.1, help="as `kdcache capture --val-fraction` will use")
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--student-hidden", type=int, default=64)
    p.add_argument("--student-layers", type=int, default=2)
    p.add_argument("--epochs", type=float, default=6.0)
    p.add_argument("--batch-size", type=int, default=32, help="conversations per step")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()

    import torch
    from transformers import LlamaForCausalLM

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    t_start = time.perf_counter()

    # 1. corpus, split as capture will split it, tokenizer on the train split
    records = build_corpus(args.seed)
    (out / "corpus").mkdir(parents=True, exist_ok=True)
    (out / "corpus" / f"{DOMAIN}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n"
                                                           for r in records))
    split = [split_of(record_key(r), 0, args.val_fraction) for r in records]
    by_split = {s: [r["messages"] for r, k in zip(records, split) if k == s] for s in ("train", "val")}
    sources = {s: sum(r["source"] == s for r in records) for s in QUESTIONS}
    print(f"corpus: {len(records)} conversations {sources}; train {len(by_split['train'])}, val "
          f"{len(by_split['val'])}", flush=True)
    tokenizer = build_tokenizer(["\n".join(m["content"] for m in c) for c in by_split["train"]], out / "tokenizer",
                                args.vocab, chat=True)
    eos_id, end_id = tokenizer.convert_tokens_to_ids(EOS), tokenizer.convert_tokens_to_ids(END)
    vocab = len(tokenizer)
    rendered = {s: render_chat(tokenizer, c)[1:] for s, c in by_split.items()}        # (ids, masks) per split
    reply_tokens = {s: sum(sum(m) for m in masks) for s, (_, masks) in rendered.items()}
    print(f"tokenizer: vocab {vocab}; reply tokens {reply_tokens}; mean conversation "
          f"{np.mean([len(x) for x in rendered['train'][0]]):.0f} tokens", flush=True)

    # 2. SFT: reply tokens only, train split only
    torch.manual_seed(args.seed)
    teacher = LlamaForCausalLM(llama_config(vocab, args.hidden, args.layers, eos_id))
    n_params = sum(p.numel() for p in teacher.parameters())
    opt = adamw(teacher, args.lr)
    ids, masks = rendered["train"]
    per_epoch = math.ceil(len(ids) / args.batch_size)
    steps = int(args.epochs * per_epoch)
    rng = np.random.default_rng([args.seed, 1])
    order = []
    print(f"teacher: {n_params / 1e6:.2f}M params (hidden {args.hidden}, {args.layers} layers), {steps} steps "
          f"({args.epochs} epochs x {per_epoch}), lr {args.lr}, {torch.get_num_threads()} threads", flush=True)
    t_train, ema = time.perf_counter(), None
    for step in range(steps):
        if len(order) < args.batch_size:
            order = list(rng.permutation(len(ids)))
        pick, order = order[:args.batch_size], order[args.batch_size:]
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.lr, max(1, steps // 20), steps)
        x, sup = padded([ids[i] for i in pick], [masks[i] for i in pick], eos_id)
        logits = teacher(input_ids=x).logits[:, :-1]                                       # (B, L-1, V)
        loss = torch.nn.functional.cross_entropy(logits[sup], x[:, 1:][sup])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(teacher.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        lv = float(loss.detach())
        ema = lv if ema is None else 0.95 * ema + 0.05 * lv
        if (step + 1) % 100 == 0 or step + 1 == steps:
            el = time.perf_counter() - t_train
            print(f"  step {step + 1}/{steps} reply loss {ema:.3f} {el:.0f}s (ETA {el / (step + 1) * (steps - step - 1):.0f}s)",
                  flush=True)
    train_s = time.perf_counter() - t_train

    # 3. report, save
    stats = {s: reply_stats(teacher, *rendered[s], eos_id) for s in ("train", "val")}
    examples = []
    teacher.eval()
    with torch.inference_mode():
        for c in by_split["val"][:4]:
            prompt = tokenizer.apply_chat_template(c[:-1], add_generation_prompt=True, return_tensors="pt",
                                                   return_dict=True)["input_ids"]
            gen = teacher.generate(prompt, max_new_tokens=48, do_sample=False, eos_token_id=[end_id, eos_id],
                                   pad_token_id=eos_id)
            examples.append({"question": c[-2]["content"], "reference": c[-1]["content"],
                             "greedy": tokenizer.decode(gen[0, prompt.shape[1]:], skip_special_tokens=True)})
    teacher.generation_config.eos_token_id = [eos_id, end_id]
    teacher.save_pretrained(out / "teacher")
    save_tokenizer(tokenizer, out / "teacher")
    student = save_student(out / "student", tokenizer, args.student_hidden, args.student_layers, args.seed + 1)
    report = {"out": str(out), "seed": args.seed, "vocab": vocab, "conversations": len(records), "sources": sources,
              "split": {s: len(c) for s, c in by_split.items()}, "val_fraction": args.val_fraction,
              "reply_tokens": reply_tokens,
              "teacher": {"params": n_params, "hidden": args.hidden, "layers": args.layers, "steps": steps,
                          "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr},
              "student": {"params": sum(p.numel() for p in student.parameters()), "hidden": args.student_hidden,
                          "layers": args.student_layers},
              "teacher_replies": stats, "examples": examples, "train_seconds": round(train_s, 1),
              "seconds": round(time.perf_counter() - t_start, 1)}
    (out / "teacher_report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    for s, v in stats.items():
        print(f"{s}: reply CE {v['reply_ce']:.3f}, reply-token entropy {v['reply_entropy']:.3f} nats "
              f"({v['tokens']} tokens)")
    for ex in examples:
        print(f"  {ex['question']!r}\n    -> {ex['greedy']!r}\n    reference {ex['reference']!r}")
    print(json.dumps({k: v for k, v in report.items() if k != "examples"}))


if __name__ == "__main__":
    main()
