"""Build the reference multi-domain corpus, its tokenizer, a small Llama teacher trained on it, and a student.

Everything is generated locally and is deterministic in --seed (no downloads):

    DIR/corpus/{code,data,prose,arith}.jsonl   {"text": ...} per line: the corpus users distil on
    DIR/corpus/chat.jsonl                      {"messages": [{"role", "content"}, ...]} per line (instructions)
    DIR/tokenizer/                             byte-level BPE trained on the corpus (eos "<|eos|>", digits split,
                                               turn tokens <|system|> <|user|> <|assistant|> <|end|>, and a
                                               chat template in tokenizer_config.json)
    DIR/teacher/                               LlamaForCausalLM (save_pretrained) + tokenizer, trained from scratch
    DIR/student/                               a smaller LlamaForCausalLM, random init (fixed seed) + tokenizer
    DIR/teacher_report.json                    the final JSON line below

The five domains are synthetic but have learnable structure beyond unigrams, and clearly different difficulty:

    code   python-like functions from a few templates; a function's parameters and locals are reused
           consistently (copying), keywords and indentation are fixed                        easy, regular
    data   JSON-lines records with fixed keys; name/age/id random, but country, currency and
           timezone are functions of the city, and "adult" of the age                        medium
    prose  sentences from a small probabilistic grammar: each document keeps one topic (its
           nouns, verbs, adjectives), subject-verb number agreement, and a few fixed
           multi-sentence patterns                                                           medium
    arith  "a + b = c", "a - b = c", "a * b = c" with correct answers (digits are tokenized
           one by one); the operands are random, the answers are a function of them      hard for a tiny model
    chat   instruction conversations about the same worlds: arithmetic questions ("What is 7 + 5?" ->
           "7 + 5 = 12."; a quarter drawn like arith's lines: 2-digit + and -, 1-digit *), questions
           answered by the data domain's city table ("Which currency is used in Paris?" -> "Paris uses
           EUR.") or its adult rule ("Is Yara, aged 15, an adult?" -> "No, Yara is not an adult yet.");
           1-3 exchanges, some with a system line; a follow-up may refer to the previous question
           ("And in Tokyo?")                                                      replies are determined

Conversations are rendered with CHAT_TEMPLATE (ChatML-like: `<|role|>content<|end|>`, each assistant reply and
its `<|end|>` inside `{% generation %}` marks, so `kdcache capture --train-on assistant` trains on exactly the
replies). The template is saved in tokenizer_config.json; `<|end|>` is also an EOS id of generation_config.json.

The teacher trains on *fresh* samples of the same generators (another seed stream), never on the corpus files: a
teacher that had memorised the corpus' arithmetic lines would make its val perplexity, and so DDK's gaps,
artificially good. Each training row is a packed sequence of one domain (documents joined with EOS). A step takes
--batch-size rows of the four text domains, drawn uniformly per row (as before the chat domain existed, so they
get the same exposure), plus --chat-rows rows of chat: conversations rendered with the template, joined with EOS,
trained on every token like the others (with 6 chat rows the 600-step teacher still miscopied one-digit operands:
72 % of its greedy replies exact, against 90 % with 10). Loop: AdamW (betas 0.9/0.95, wd 0.1), linear warm-up then
cosine to 10 %, clip 1.0, float32 on CPU. The per-domain teacher CE at the end is measured on the corpus files (what `kdcache capture` sees);
for chat also on the reply tokens alone, each conversation on its own (as `kdcache eval` measures a chat cache),
and the teacher's greedy replies to the last turn of corpus conversations are checked against the reference.

    python scripts/train_reference_teacher.py --out DIR [--steps 600 | --minutes M] [--seed 0] [--threads 1]
                                              [--batch-size 32] [--chat-rows 10]

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

DOMAINS = ("code", "data", "prose", "arith", "chat")
TEXT_DOMAINS = DOMAINS[:4]
EOS = "<|eos|>"
DOCS = {"code": 2500, "data": 2500, "prose": 2500, "arith": 2500, "chat": 2500}     # corpus documents per domain
TURN_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
END = "<|end|>"                                                  # end of a turn: where a reply stops
# `<|role|>content<|end|>` per message; an assistant reply and its <|end|> are the trained tokens.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|' + message['role'] + '|>' }}"
    "{%- if message['role'] == 'assistant' -%}"
    "{% generation %}{{ message['content'] + '<|end|>' }}{% endgeneration %}"
    "{%- else -%}"
    "{{ message['content'] + '<|end|>' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|assistant|>' }}{%- endif -%}")

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


def _equation(rng) -> tuple[int, str, int, int]:
    """(a, op, b, c) with c = a op b: 2-digit + and - (never negative), 1-digit *."""
    op = _pick(rng, OPS)
    if op == "*":
        a, b = int(rng.integers(2, 10)), int(rng.integers(2, 10))
        return a, op, b, a * b
    a, b = int(rng.integers(10, 100)), int(rng.integers(10, 100))
    if op == "-" and b > a:
        a, b = b, a
    return a, op, b, a + b if op == "+" else a - b


def _small_equation(rng) -> tuple[int, str, int, int]:
    """(a, op, b, c) with c = a op b and one-digit operands (never negative)."""
    op = _pick(rng, OPS)
    a, b = int(rng.integers(1, 10)), int(rng.integers(1, 10))
    if op == "-" and b > a:
        a, b = b, a
    return a, op, b, a + b if op == "+" else a - b if op == "-" else a * b


def gen_arith(rng) -> str:
    """3-8 correct equations, one per line: 2-digit + and -, 1-digit *."""
    lines = []
    for _ in range(int(rng.integers(3, 9))):
        a, op, b, c = _equation(rng)
        lines.append(f"{a} {op} {b} = {c}")
    return "\n".join(lines)


SYSTEMS = ("You are a helpful assistant.", "Answer in one short sentence.",
           "You answer questions about sums and cities.", "Be brief and exact.")
ARITH_Q = ("What is {a} {op} {b}?", "Compute {a} {op} {b}.", "How much is {a} {op} {b}?",
           "Please work out {a} {op} {b}.")
CITY_Q = {  # the question kinds the city table answers: (question templates, reply template)
    "country": (("Which country is {city} in?", "In which country is {city}?", "Where is {city}?"),
                "{city} is in {country}."),
    "currency": (("Which currency is used in {city}?", "What money do people use in {city}?",
                  "What is the currency of {city}?"), "{city} uses {currency}."),
    "tz": (("What time zone is {city} in?", "Which time zone does {city} use?"), "{city} is on {tz} time."),
}
ADULT_Q = ("{name} is {age} years old. Is {name} an adult?", "Is {name}, aged {age}, an adult?")
HARD_SUMS = 0.25          # share of arithmetic questions drawn like arith's lines (2-digit + and -, 1-digit *)


def _country(c: str) -> str:
    return {"uk": "the UK", "usa": "the USA"}.get(c, c.capitalize())


def _city_facts(city: str) -> dict:
    country, cur, tz = CITIES[city]
    return {"city": city.capitalize(), "country": _country(country), "currency": cur.upper(), "tz": tz.upper()}


def _exchange(rng, previous: str | None) -> tuple[str, str, str]:
    """(question, reply, kind) of one exchange; after a city question, sometimes a follow-up about another city
    whose answer depends on the previous question ("And in Tokyo?")."""
    if previous in CITY_Q and rng.random() < 0.5:
        facts = _city_facts(_pick(rng, list(CITIES)))
        return _pick(rng, ("And in {city}?", "What about {city}?")).format(**facts), \
            CITY_Q[previous][1].format(**facts), previous
    kind = _pick(rng, ("arith", "arith", "country", "currency", "tz", "adult"))
    if kind == "arith":
        a, op, b, c = _equation(rng) if rng.random() < HARD_SUMS else _small_equation(rng)
        return _pick(rng, ARITH_Q).format(a=a, op=op, b=b), f"{a} {op} {b} = {c}.", kind
    if kind == "adult":
        name, age = _pick(rng, NAMES).capitalize(), int(rng.integers(12, 80))
        reply = f"Yes, {name} is an adult." if age >= 18 else f"No, {name} is not an adult yet."
        return _pick(rng, ADULT_Q).format(name=name, age=age), reply, kind
    facts = _city_facts(_pick(rng, list(CITIES)))
    questions, reply = CITY_Q[kind]
    return _pick(rng, questions).format(**facts), reply.format(**facts), kind


def gen_chat(rng) -> list[dict]:
    """An instruction conversation: an optional system line (p 0.35), then 1-3 user/assistant exchanges
    (p 0.6/0.3/0.1) about sums and the data domain's city table; every reply is determined by the conversation."""
    messages = [{"role": "system", "content": _pick(rng, SYSTEMS)}] if rng.random() < 0.35 else []
    previous = None
    for _ in range(int(rng.choice([1, 2, 3], p=[0.6, 0.3, 0.1]))):
        question, reply, previous = _exchange(rng, previous)
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": reply}]
    return messages


GENERATORS = {"code": gen_code, "data": gen_data, "prose": gen_prose, "arith": gen_arith, "chat": gen_chat}


def domain_docs(domain: str, n: int, seed: int, stream: int) -> list:
    """n documents of `domain` (texts; chat: message lists), deterministic in (domain, seed, stream); stream 0 =
    the corpus files, 1 = the teacher's training stream (disjoint samples of the same distribution)."""
    rng = np.random.default_rng([seed, stream, DOMAINS.index(domain)])
    return [GENERATORS[domain](rng) for _ in range(n)]


def write_corpus(out: Path, seed: int) -> dict[str, list]:
    out.mkdir(parents=True, exist_ok=True)
    docs = {d: domain_docs(d, DOCS[d], seed, 0) for d in DOMAINS}
    for d, items in docs.items():
        key = "messages" if d == "chat" else "text"
        (out / f"{d}.jsonl").write_text("".join(json.dumps({key: x}) + "\n" for x in items))
    return docs


def plain_texts(domain: str, items: list) -> list[str]:
    """What the tokenizer trains on: the texts, or each conversation's message contents, one per line."""
    return ["\n".join(m["content"] for m in x) for x in items] if domain == "chat" else items


# ---------------------------------------------------------------------------------------------------- tokenizer

def build_tokenizer(texts: list[str], out: Path, vocab_size: int, chat: bool = False):
    """Byte-level BPE (digits split one by one) trained on `texts`, saved as a transformers tokenizer. With
    `chat`: the turn tokens as special tokens (ids 1-4, after EOS) and CHAT_TEMPLATE, saved in
    tokenizer_config.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [EOS, *TURN_TOKENS] if chat else [EOS]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS,
                                   **({"extra_special_tokens": list(TURN_TOKENS)} if chat else {}))
    if chat:
        fast.chat_template = CHAT_TEMPLATE
    save_tokenizer(fast, out)
    return fast


def save_tokenizer(tokenizer, out: Path) -> None:
    """save_pretrained with the chat template inside tokenizer_config.json (not a separate .jinja file)."""
    tokenizer.save_pretrained(out, save_jinja_files=False)


def render_chat(tokenizer, conversations: list[list[dict]]) -> tuple[list[str], list[list[int]], list[list[bool]]]:
    """Each conversation rendered with the tokenizer's chat template: its text, its ids and per id whether it is a
    reply token (inside the template's generation marks)."""
    texts, ids, masks = [], [], []
    for messages in conversations:
        out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True)
        texts.append(tokenizer.apply_chat_template(messages, tokenize=False))
        ids.append(list(out["input_ids"]))
        masks.append([bool(m) for m in out["assistant_masks"]])
    return texts, ids, masks


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


def save_student(path: Path, tokenizer, hidden: int, layers: int, seed: int):
    """A random-init Llama student (seeded) that stops at EOS or the end of a turn, saved with the tokenizer."""
    import torch
    from transformers import LlamaForCausalLM
    eos_id, end_id = tokenizer.convert_tokens_to_ids(EOS), tokenizer.convert_tokens_to_ids(END)
    torch.manual_seed(seed)
    student = LlamaForCausalLM(llama_config(len(tokenizer), hidden, layers, eos_id))
    student.generation_config.eos_token_id = [eos_id, end_id]
    student.save_pretrained(path)
    save_tokenizer(tokenizer, path)
    return student


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


def reply_ce(model, ids: list[list[int]], masks: list[list[bool]], pad_id: int, batch_size: int = 32) -> float:
    """Mean CE (nats) over the positions whose next token is a reply token, each conversation on its own (as
    `kdcache capture --packing isolated --train-on assistant` and `kdcache eval` see a chat corpus)."""
    import torch
    model.eval()
    tot, n = 0.0, 0
    with torch.inference_mode():
        for i in range(0, len(ids), batch_size):
            L = max(len(x) for x in ids[i:i + batch_size])
            x = torch.tensor([x + [pad_id] * (L - len(x)) for x in ids[i:i + batch_size]])        # (B, L)
            sup = torch.tensor([m[1:] + [False] * (L - len(m)) for m in masks[i:i + batch_size]])  # (B, L-1)
            logits = model(input_ids=x).logits[:, :-1].float()      # right padding: causal, real tokens unaffected
            ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), x[:, 1:], reduction="none")
            tot, n = tot + float(ce[sup].sum()), n + int(sup.sum())
    model.train()
    return tot / max(n, 1)


CHECK_DOCS = 200          # corpus conversations whose last reply the teacher is asked for


def greedy_check(model, tokenizer, conversations: list[list[dict]], ids: list[list[int]], masks: list[list[bool]],
                 stop_ids: list[int], max_new_tokens: int = 32) -> dict:
    """The model's greedy reply to the last user turn of each conversation (the prompt: every token before the
    last reply) against the reference reply: exact-match rates (all, sums, city/age facts) and a few examples."""
    import torch
    model.eval()
    hits = {"sums": [], "facts": []}
    examples = []
    with torch.inference_mode():
        for messages, x, m in zip(conversations, ids, masks):
            start = max(i for i in range(len(m)) if m[i] and (i == 0 or not m[i - 1]))   # the last reply's start
            out = model.generate(torch.tensor([x[:start]]), max_new_tokens=max_new_tokens, do_sample=False,
                                 eos_token_id=stop_ids, pad_token_id=stop_ids[-1])
            reply = tokenizer.decode(out[0, start:], skip_special_tokens=True)
            reference = messages[-1]["content"]
            hits["sums" if " = " in reference else "facts"].append(reply == reference)
            if len(examples) < 6:
                examples.append({"question": messages[-2]["content"], "reply": reply, "reference": reference})
    model.train()
    rate = lambda h: round(sum(h) / max(len(h), 1), 3)   # noqa: E731
    return {"n": len(conversations), "exact": rate(hits["sums"] + hits["facts"]), "exact_sums": rate(hits["sums"]),
            "n_sums": len(hits["sums"]), "exact_facts": rate(hits["facts"]), "n_facts": len(hits["facts"]),
            "examples": examples}


def adamw(model, lr: float):
    """AdamW (betas 0.9/0.95), weight decay 0.1 on matrices only."""
    import torch
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                             lr=lr, betas=(0.9, 0.95))


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
    p.add_argument("--batch-size", type=int, default=32, help="text-domain rows per step")
    p.add_argument("--chat-rows", type=int, default=10, help="chat rows per step, on top of --batch-size")
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
    tokenizer = build_tokenizer([t for d in DOMAINS for t in plain_texts(d, docs[d])], out / "tokenizer", args.vocab,
                                chat=True)
    eos_id = tokenizer.convert_tokens_to_ids(EOS)
    end_id = tokenizer.convert_tokens_to_ids(END)
    vocab = len(tokenizer)
    chat_texts, chat_ids, chat_masks = render_chat(tokenizer, docs["chat"])
    corpus_rows = {d: pack(tokenizer, chat_texts if d == "chat" else docs[d], args.seq_len) for d in DOMAINS}
    corpus_tokens = {d: int(r.size) for d, r in corpus_rows.items()}
    print(f"tokenizer: vocab {vocab}; corpus tokens {corpus_tokens}", flush=True)

    # 2. the teacher's training stream: fresh samples of the same generators, packed per domain
    eval_rows = {d: r[:48] for d, r in corpus_rows.items()}          # progress + final per-domain CE
    max_steps = args.steps if not args.minutes else 4000
    per_domain = {d: args.batch_size * max_steps // len(TEXT_DOMAINS) + 1 for d in TEXT_DOMAINS}
    per_domain["chat"] = args.chat_rows * max_steps + 1
    train_rows = {}
    for d in DOMAINS:
        n_docs = max(1000, int(per_domain[d] * args.seq_len / (corpus_tokens[d] / DOCS[d]) * 1.05) + 10)
        n_docs = min(n_docs, 60000)                              # cap generation; rows are reused (epochs) beyond
        fresh = domain_docs(d, n_docs, args.seed, 1)
        if d == "chat":
            fresh = [tokenizer.apply_chat_template(m, tokenize=False) for m in fresh]
        train_rows[d] = pack(tokenizer, fresh, args.seq_len)
    print(f"teacher stream: rows per domain {({d: len(r) for d, r in train_rows.items()})} "
          f"({args.batch_size} text + {args.chat_rows} chat rows/step)", flush=True)

    # 3. the teacher
    torch.manual_seed(args.seed)
    teacher = LlamaForCausalLM(llama_config(vocab, args.hidden, args.layers, eos_id))
    n_params = sum(p.numel() for p in teacher.parameters())
    opt = adamw(teacher, args.lr)
    text_rng = np.random.default_rng([args.seed, 2])                    # one stream for the text rows
    rngs = {**{d: text_rng for d in TEXT_DOMAINS}, "chat": np.random.default_rng([args.seed, 3])}
    cursor = {d: 0 for d in DOMAINS}
    order = {d: rngs[d].permutation(len(train_rows[d])) for d in DOMAINS}

    def take(d: str) -> np.ndarray:
        if cursor[d] == len(order[d]):
            order[d], cursor[d] = rngs[d].permutation(len(train_rows[d])), 0
        cursor[d] += 1
        return train_rows[d][order[d][cursor[d] - 1]]

    def batch() -> torch.Tensor:
        picks = text_rng.integers(0, len(TEXT_DOMAINS), size=args.batch_size)
        rows = [take(TEXT_DOMAINS[k]) for k in picks] + [take("chat") for _ in range(args.chat_rows)]
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
    teacher_reply_ce = reply_ce(teacher, chat_ids[:1024], chat_masks[:1024], eos_id)
    answers = greedy_check(teacher, tokenizer, docs["chat"][:CHECK_DOCS], chat_ids[:CHECK_DOCS],
                           chat_masks[:CHECK_DOCS], [end_id, eos_id])
    teacher.generation_config.eos_token_id = [eos_id, end_id]      # HF generate stops at the end of a turn
    teacher.save_pretrained(out / "teacher")
    save_tokenizer(tokenizer, out / "teacher")
    student = save_student(out / "student", tokenizer, args.student_hidden, args.student_layers, args.seed + 1)
    student_ce = domain_ce(student, {d: r[:16] for d, r in corpus_rows.items()})

    print(f"\n{'domain':<8} {'teacher CE':>10} {'ppl':>8} {'random student ppl':>19}")
    for d in DOMAINS:
        print(f"{d:<8} {teacher_ce[d]:>10.3f} {math.exp(teacher_ce[d]):>8.2f} {math.exp(student_ce[d]):>19.1f}")
    print(f"chat replies only: teacher CE {teacher_reply_ce:.3f} (ppl {math.exp(teacher_reply_ce):.2f}); greedy "
          f"replies to the last turn of {answers['n']} corpus conversations: {answers['exact']:.0%} exact "
          f"(sums {answers['exact_sums']:.0%}, facts {answers['exact_facts']:.0%})")
    for ex in answers["examples"]:
        print(f"  {ex['question']!r} -> {ex['reply']!r} (reference {ex['reference']!r})")
    result = {"out": str(out), "seed": args.seed, "vocab": vocab, "seq_len": args.seq_len,
              "corpus_docs": {d: len(docs[d]) for d in DOMAINS}, "corpus_bytes": sizes,
              "corpus_tokens": corpus_tokens,
              "teacher": {"params": n_params, "hidden": args.hidden, "layers": args.layers, "steps": steps,
                          "batch_size": args.batch_size, "lr": args.lr,
                          "chat_rows": args.chat_rows,
                          "train_tokens": steps * (args.batch_size + args.chat_rows) * args.seq_len,
                          "bytes": sum(f.stat().st_size for f in (out / "teacher").iterdir())},
              "student": {"params": sum(p.numel() for p in student.parameters()), "hidden": args.student_hidden,
                          "layers": args.student_layers},
              "teacher_ce": {d: round(v, 4) for d, v in teacher_ce.items()},
              "teacher_ce_chat_replies": round(teacher_reply_ce, 4),
              "teacher_greedy_replies": answers,
              "random_student_ce": {d: round(v, 4) for d, v in student_ce.items()},
              "train_seconds": round(train_s, 1), "seconds": round(time.perf_counter() - t_start, 1),
              "threads": torch.get_num_threads()}
    (out / "teacher_report.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    sys.exit(main())
