"""Build the reference multi-domain corpus, its tokenizer, a small Llama teacher trained on it, and a student.

Everything is generated locally and is deterministic in --seed (no downloads):

    DIR/corpus/{code,data,prose,arith}.jsonl   {"text": ...} per line: the corpus users distil on
    DIR/tokenizer/                             byte-level BPE trained on the corpus (eos "<|eos|>", digits split)
    DIR/teacher/                               LlamaForCausalLM (save_pretrained) + tokenizer, trained from scratch
    DIR/student/                               a smaller LlamaForCausalLM, random init (fixed seed) + tokenizer
    DIR/teacher_report.json                    the final JSON line below

The four domains are synthetic but have learnable structure beyond unigrams, and clearly different difficulty:

    code   python-like functions from a few templates; a function's parameters and locals are reused
           consistently (copying), keywords and indentation are fixed                        easy, regular
    data   JSON-lines records with fixed keys; name/age/id random, but country, currency and
           timezone are functions of the city, and "adult" of the age                        medium
    prose  sentences from a small probabilistic grammar: each document keeps one topic (its
           nouns, verbs, adjectives), subject-verb number agreement, and a few fixed
           multi-sentence patterns                                                           medium
    arith  "a + b = c", "a - b = c", "a * b = c" with correct answers (digits are tokenized
           one by one); the operands are random, the answers are a function of them      hard for a tiny model

The teacher trains on *fresh* samples of the same generators (another seed stream), never on the corpus files: a
teacher that had memorised the corpus' arithmetic lines would make its val perplexity, and so DDK's gaps,
artificially good. Each training row is a packed sequence of one domain (documents joined with EOS); domains are
drawn uniformly per row. Loop: AdamW (betas 0.9/0.95, wd 0.1), linear warm-up then cosine to 10 %, clip 1.0,
float32 on CPU. The per-domain teacher CE at the end is measured on the corpus files (what `kdcache capture` sees).

    python scripts/train_reference_teacher.py --out DIR [--steps 600 | --minutes M] [--seed 0] [--threads 1]

`--steps` (default) is reproducible bit for bit on the same machine; `--minutes` estimates the steps from the speed
of the first steps and is not. Prints progress and a final JSON line.
"""

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

DOMAINS = ("code", "data", "prose", "arith")
EOS = "<|eos|>"
DOCS = {"code": 2500, "data": 2500, "prose": 2500, "arith": 2500}     # corpus documents per domain

# ---------------------------------------------------------------------------------------------------- generators

IDENT = ("value count total items index result data item key node size left right name limit offset step scale "
         "first last buffer score weight factor text line word row col flag").split()
FUNC = ("compute process update merge scale filter collect parse render build load apply reduce normalize count "
        "find check split join clean").split()
CLASS = "Parser Buffer Counter Loader Cache Queue Matrix Vector Tokenizer Reader Writer Model".split()
OPS = ("+", "-", "*")
CMPS = (">", "<", ">=", "<=", "==")


def _pick(rng, seq, n=1, replace=False):
    idx = rng.choice(len(seq), size=n, replace=replace)
    return [seq[i] for i in idx] if n > 1 else seq[idx[0]]


def gen_code(rng) -> str:
    """1-3 python-like functions/classes from templates; names drawn per function and reused consistently."""
    parts = []
    for _ in range(int(rng.integers(1, 4))):
        a, b, r, x, acc = _pick(rng, IDENT, 5)
        f, n, op, cmp = _pick(rng, FUNC), int(rng.integers(1, 20)), _pick(rng, OPS), _pick(rng, CMPS)
        t = int(rng.integers(5))
        if t == 0:
            parts.append(f"def {f}_{a}({a}, {b}):\n    {r} = {a} {op} {b}\n    if {r} {cmp} {n}:\n"
                         f"        {r} = {r} - {n}\n    return {r}\n")
        elif t == 1:
            parts.append(f"def {f}_{acc}({a}s):\n    {acc} = 0\n    for {x} in {a}s:\n        {acc} += {x}\n"
                         f"    return {acc}\n")
        elif t == 2:
            parts.append(f"def {f}_{a}s({a}s, {b}):\n    {r} = []\n    for {x} in {a}s:\n"
                         f"        if {x} {cmp} {b}:\n            {r}.append({x})\n    return {r}\n")
        elif t == 3:
            c = _pick(rng, CLASS)
            parts.append(f"class {c}:\n    def __init__(self, {a}, {b}):\n        self.{a} = {a}\n"
                         f"        self.{b} = {b}\n\n    def {f}(self):\n        return self.{a} {op} self.{b}\n")
        else:
            parts.append(f"def {f}({a}, {b}={n}):\n    while {a} {cmp} {b}:\n        {a} = {a} {op} 1\n"
                         f"    return {a}\n")
    return "\n".join(parts)


NAMES = ("alice bob carol dave erin frank grace heidi ivan judy mallory nina oscar peggy rupert sybil trent "
         "victor walter yara zane").split()
CITIES = {  # city: (country, currency, timezone)
    "paris": ("france", "eur", "cet"), "lyon": ("france", "eur", "cet"), "berlin": ("germany", "eur", "cet"),
    "munich": ("germany", "eur", "cet"), "madrid": ("spain", "eur", "cet"), "rome": ("italy", "eur", "cet"),
    "london": ("uk", "gbp", "gmt"), "leeds": ("uk", "gbp", "gmt"), "tokyo": ("japan", "jpy", "jst"),
    "osaka": ("japan", "jpy", "jst"), "boston": ("usa", "usd", "est"), "denver": ("usa", "usd", "mst"),
    "seattle": ("usa", "usd", "pst"), "toronto": ("canada", "cad", "est"), "sydney": ("australia", "aud", "aest"),
    "lima": ("peru", "pen", "pet"),
}
PLANS = ("free", "basic", "pro", "team")


def gen_data(rng) -> str:
    """1-4 JSON lines with fixed keys; country/currency/tz follow the city, adult follows the age."""
    lines = []
    for _ in range(int(rng.integers(1, 5))):
        city = _pick(rng, list(CITIES))
        country, cur, tz = CITIES[city]
        age = int(rng.integers(12, 80))
        lines.append(json.dumps({"id": int(rng.integers(1000, 10000)), "name": _pick(rng, NAMES), "age": age,
                                 "adult": age >= 18, "city": city, "country": country, "currency": cur, "tz": tz,
                                 "plan": _pick(rng, PLANS)}))
    return "\n".join(lines)


TOPICS = {
    "farm": dict(noun=["farmer", "cow", "horse", "dog", "goat", "hen"], place=["barn", "field", "yard", "farm"],
                 verb=["feed", "watch", "chase", "follow", "call"], adj=["old", "brown", "quiet", "muddy", "tired"]),
    "sea": dict(noun=["sailor", "fish", "whale", "captain", "gull", "crab"], place=["harbor", "beach", "boat", "bay"],
                verb=["see", "catch", "follow", "greet", "avoid"], adj=["salty", "grey", "swift", "wet", "calm"]),
    "city": dict(noun=["driver", "clerk", "student", "doctor", "artist", "baker"],
                 place=["station", "office", "market", "park"], verb=["meet", "help", "visit", "call", "thank"],
                 adj=["busy", "young", "polite", "late", "clever"]),
    "forest": dict(noun=["hunter", "fox", "wolf", "owl", "deer", "bear"], place=["river", "cave", "hill", "forest"],
                   verb=["hear", "track", "watch", "avoid", "find"], adj=["dark", "silent", "wild", "small", "hungry"]),
}
TIMES = ["in the morning", "at night", "every day", "after the rain", "before noon"]


def _np(rng, t, plural):
    det = _pick(rng, ["the", "some", "two"]) if plural else _pick(rng, ["the", "a", "one"])
    adj = f"{_pick(rng, t['adj'])} " if rng.random() < 0.5 else ""
    return f"{det} {adj}{_pick(rng, t['noun'])}{'s' if plural else ''}"


def _vp(rng, t, plural):
    v = _pick(rng, t["verb"])
    return v if plural else v + ("es" if v.endswith(("ch", "sh", "s", "x")) else "s")


def gen_prose(rng) -> str:
    """3-7 sentences on one topic: agreement between subject and verb, places and times from fixed phrases."""
    t = TOPICS[_pick(rng, list(TOPICS))]
    out = []
    for _ in range(int(rng.integers(3, 8))):
        pl = bool(rng.random() < 0.4)
        subj = _np(rng, t, pl)
        k = int(rng.integers(4))
        if k == 0:
            s = f"{subj} {_vp(rng, t, pl)} {_np(rng, t, bool(rng.random() < 0.4))} near the {_pick(rng, t['place'])}"
        elif k == 1:
            s = f"{subj} {'were' if pl else 'was'} {_pick(rng, t['adj'])} {_pick(rng, TIMES)}"
        elif k == 2:
            s = (f"{subj} {_vp(rng, t, pl)} {_np(rng, t, False)} and then {'they' if pl else 'it'} "
                 f"{'go' if pl else 'goes'} to the {_pick(rng, t['place'])}")
        else:
            s = f"when {subj} {'are' if pl else 'is'} {_pick(rng, t['adj'])} , {'they' if pl else 'it'} " \
                f"{_vp(rng, t, pl)} {_np(rng, t, bool(rng.random() < 0.4))}"
        out.append(s[0].upper() + s[1:] + " .")
    return " ".join(out)


def gen_arith(rng) -> str:
    """3-8 correct equations, one per line: 2-digit + and -, 1-digit *."""
    lines = []
    for _ in range(int(rng.integers(3, 9))):
        op = _pick(rng, OPS)
        if op == "*":
            a, b = int(rng.integers(2, 10)), int(rng.integers(2, 10))
            c = a * b
        else:
            a, b = int(rng.integers(10, 100)), int(rng.integers(10, 100))
            if op == "-" and b > a:
                a, b = b, a
            c = a + b if op == "+" else a - b
        lines.append(f"{a} {op} {b} = {c}")
    return "\n".join(lines)


GENERATORS = {"code": gen_code, "data": gen_data, "prose": gen_prose, "arith": gen_arith}


def domain_docs(domain: str, n: int, seed: int, stream: int) -> list[str]:
    """n documents of `domain`, deterministic in (domain, seed, stream); stream 0 = the corpus files, 1 = the
    teacher's training stream (disjoint samples of the same distribution)."""
    rng = np.random.default_rng([seed, stream, DOMAINS.index(domain)])
    return [GENERATORS[domain](rng) for _ in range(n)]


def write_corpus(out: Path, seed: int) -> dict[str, list[str]]:
    out.mkdir(parents=True, exist_ok=True)
    docs = {d: domain_docs(d, DOCS[d], seed, 0) for d in DOMAINS}
    for d, texts in docs.items():
        (out / f"{d}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return docs


# ---------------------------------------------------------------------------------------------------- tokenizer

def build_tokenizer(texts: list[str], out: Path, vocab_size: int):
    """Byte-level BPE (digits split one by one) trained on `texts`, saved as a transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS)
    fast.save_pretrained(out)
    return fast


def pack(tokenizer, texts: list[str], seq_len: int) -> np.ndarray:
    """Documents joined with EOS, cut into (rows, seq_len) int64 (the tail that does not fill a row is dropped)."""
    eos = tokenizer.convert_tokens_to_ids(EOS)
    ids = []
    for enc in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        ids.extend(enc)
        ids.append(eos)
    n = len(ids) // seq_len
    return np.asarray(ids[: n * seq_len], dtype=np.int64).reshape(n, seq_len)


# ---------------------------------------------------------------------------------------------------- models

def llama_config(vocab: int, hidden: int, layers: int, eos_id: int, intermediate: int | None = None):
    """head_dim 32 (vLLM's CPU attention kernels support no smaller head)."""
    from transformers import LlamaConfig
    heads = max(1, hidden // 32)
    return LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate or hidden * 4,
                       num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                       max_position_embeddings=512, bos_token_id=eos_id, eos_token_id=eos_id,
                       tie_word_embeddings=False, rope_theta=10000.0, torch_dtype="float32")


def domain_ce(model, rows: dict[str, np.ndarray], batch_size: int = 16) -> dict[str, float]:
    """Mean next-token CE (nats) per domain over the given packed rows."""
    import torch
    model.eval()
    out = {}
    with torch.inference_mode():
        for d, r in rows.items():
            tot, n = 0.0, 0
            for i in range(0, len(r), batch_size):
                x = torch.from_numpy(r[i:i + batch_size])
                logits = model(input_ids=x).logits[:, :-1].float()
                ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                                                       reduction="sum")
                tot, n = tot + float(ce), n + x[:, 1:].numel()
            out[d] = tot / max(n, 1)
    model.train()
    return out


def lr_at(step: int, lr: float, warmup: int, steps: int, min_ratio: float = 0.1) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, steps - 1 - warmup))
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=600, help="teacher optimizer steps (reproducible)")
    p.add_argument("--minutes", type=float, help="instead of --steps: train about this long (not reproducible)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--student-hidden", type=int, default=64)
    p.add_argument("--student-layers", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (0: torch's default; on a shared 2-core host 1 is several times faster)")
    args = p.parse_args()

    import torch
    from transformers import LlamaForCausalLM

    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    t_start = time.perf_counter()

    # 1. corpus + tokenizer
    docs = write_corpus(out / "corpus", args.seed)
    sizes = {d: (out / "corpus" / f"{d}.jsonl").stat().st_size for d in DOMAINS}
    print(f"corpus: {', '.join(f'{d} {len(docs[d])} docs {sizes[d] / 1e6:.2f} MB' for d in DOMAINS)}", flush=True)
    tokenizer = build_tokenizer([t for d in DOMAINS for t in docs[d]], out / "tokenizer", args.vocab)
    eos_id = tokenizer.convert_tokens_to_ids(EOS)
    vocab = len(tokenizer)
    corpus_rows = {d: pack(tokenizer, docs[d], args.seq_len) for d in DOMAINS}
    corpus_tokens = {d: int(r.size) for d, r in corpus_rows.items()}
    print(f"tokenizer: vocab {vocab}; corpus tokens {corpus_tokens}", flush=True)

    # 2. the teacher's training stream: fresh samples of the same generators, packed per domain
    eval_rows = {d: r[:48] for d, r in corpus_rows.items()}          # progress + final per-domain CE
    need_rows = args.batch_size * (args.steps if not args.minutes else 4000)
    per_domain = need_rows // len(DOMAINS) + 1
    train_rows = {}
    for d in DOMAINS:
        n_docs = max(1000, int(per_domain * args.seq_len / (corpus_tokens[d] / DOCS[d]) * 1.05) + 10)
        n_docs = min(n_docs, 60000)                              # cap generation; rows are reused (epochs) beyond
        train_rows[d] = pack(tokenizer, domain_docs(d, n_docs, args.seed, 1), args.seq_len)
    print(f"teacher stream: rows per domain {({d: len(r) for d, r in train_rows.items()})} "
          f"({args.batch_size} rows/step)", flush=True)

    # 3. the teacher
    torch.manual_seed(args.seed)
    teacher = LlamaForCausalLM(llama_config(vocab, args.hidden, args.layers, eos_id))
    n_params = sum(p.numel() for p in teacher.parameters())
    decay = [p for p in teacher.parameters() if p.dim() >= 2]
    no_decay = [p for p in teacher.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95))
    rng = np.random.default_rng([args.seed, 2])
    cursor = {d: 0 for d in DOMAINS}
    order = {d: rng.permutation(len(train_rows[d])) for d in DOMAINS}

    def batch() -> torch.Tensor:
        picks = rng.integers(0, len(DOMAINS), size=args.batch_size)
        rows = []
        for k in picks:
            d = DOMAINS[k]
            if cursor[d] == len(order[d]):
                order[d], cursor[d] = rng.permutation(len(train_rows[d])), 0
            rows.append(train_rows[d][order[d][cursor[d]]])
            cursor[d] += 1
        return torch.from_numpy(np.stack(rows))

    steps = args.steps
    print(f"teacher: {n_params / 1e6:.2f}M params (hidden {args.hidden}, {args.layers} layers); "
          f"{'~%.1f min' % args.minutes if args.minutes else f'{steps} steps'}, lr {args.lr}, "
          f"{torch.get_num_threads()} threads", flush=True)
    t_train = time.perf_counter()
    step, ema = 0, None
    while step < steps:
        if args.minutes and step == 10:                           # calibrate the steps from the first ten
            per_step = (time.perf_counter() - t_train) / 10
            steps = max(20, int(args.minutes * 60 / per_step))
            print(f"  {per_step:.3f}s/step -> {steps} steps", flush=True)
        lr = lr_at(step, args.lr, max(1, (args.steps if not args.minutes else 1000) // 20), steps)
        for g in opt.param_groups:
            g["lr"] = lr
        x = batch()
        logits = teacher(input_ids=x).logits[:, :-1]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, vocab), x[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(teacher.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        lv = float(loss.detach())
        ema = lv if ema is None else 0.95 * ema + 0.05 * lv
        if step % 100 == 0 or step == steps:
            el = time.perf_counter() - t_train
            msg = f"  step {step}/{steps} loss {ema:.3f} lr {lr:.2e} {el:.0f}s"
            if step % 400 == 0 or step == steps:
                msg += " | val ce " + " ".join(f"{d} {v:.3f}" for d, v in domain_ce(teacher, eval_rows).items())
            print(msg, flush=True)
    train_s = time.perf_counter() - t_train

    # 4. save teacher + student
    teacher_ce = domain_ce(teacher, {d: r[:256] for d, r in corpus_rows.items()})
    teacher.save_pretrained(out / "teacher")
    tokenizer.save_pretrained(out / "teacher")
    torch.manual_seed(args.seed + 1)
    student = LlamaForCausalLM(llama_config(vocab, args.student_hidden, args.student_layers, eos_id))
    student.save_pretrained(out / "student")
    tokenizer.save_pretrained(out / "student")
    student_ce = domain_ce(student, {d: r[:16] for d, r in corpus_rows.items()})

    print(f"\n{'domain':<8} {'teacher CE':>10} {'ppl':>8} {'random student ppl':>19}")
    for d in DOMAINS:
        print(f"{d:<8} {teacher_ce[d]:>10.3f} {math.exp(teacher_ce[d]):>8.2f} {math.exp(student_ce[d]):>19.1f}")
    result = {"out": str(out), "seed": args.seed, "vocab": vocab, "seq_len": args.seq_len,
              "corpus_docs": {d: len(docs[d]) for d in DOMAINS}, "corpus_bytes": sizes,
              "corpus_tokens": corpus_tokens,
              "teacher": {"params": n_params, "hidden": args.hidden, "layers": args.layers, "steps": steps,
                          "batch_size": args.batch_size, "lr": args.lr,
                          "train_tokens": steps * args.batch_size * args.seq_len,
                          "bytes": sum(f.stat().st_size for f in (out / "teacher").iterdir())},
              "student": {"params": sum(p.numel() for p in student.parameters()), "hidden": args.student_hidden,
                          "layers": args.student_layers},
              "teacher_ce": {d: round(v, 4) for d, v in teacher_ce.items()},
              "random_student_ce": {d: round(v, 4) for d, v in student_ce.items()},
              "train_seconds": round(train_s, 1), "seconds": round(time.perf_counter() - t_start, 1),
              "threads": torch.get_num_threads()}
    (out / "teacher_report.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    sys.exit(main())
