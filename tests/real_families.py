"""The published tokenizers of real teacher families (fetched by `make setup`: scripts/fetch_tokenizers.sh) and, for
those that publish a chat template, a reference of what that template renders and what a model generates in it,
written by hand from each family's documented format, independently of pipeline.chat and of Jinja.

`reference(family, messages)` gives (text, trained) segments whose concatenation is the render; tokenizing each
segment alone with `tokenizers.Tokenizer` gives the reference ids and mask (the tests check that the segments' ends
are token boundaries, so the reference is the real tokenization)."""

from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).parent / "real_tokenizers"
ALL = ("llama3", "llama3_1", "qwen3", "gemma3", "deepseek_v3", "gptoss", "llama2")
WITH_TEMPLATE = ("llama3", "llama3_1", "qwen3", "gemma3", "deepseek_v3")


def path(family: str) -> Path:
    """The directory with the family's published tokenizer.json and tokenizer_config.json; fails (never skips)
    when the set-up has not fetched them."""
    p = ROOT / family
    if not (p / "tokenizer.json").is_file():
        pytest.fail(f"{p}/tokenizer.json is missing: run `make setup` (scripts/fetch_tokenizers.sh fetches it)")
    return p


@cache
def tokenizer(family: str):
    """The family's tokenizer as kdcache loads it (trainer.tokenizer.load_tokenizer)."""
    from trainer.tokenizer import load_tokenizer
    return load_tokenizer(path(family), family)


@cache
def raw(family: str):
    from tokenizers import Tokenizer
    return Tokenizer.from_file(str(path(family) / "tokenizer.json"))


def _llama3(messages, generation_header: bool, train_reasoning: bool):
    out = [("<|begin_of_text|>", False)]
    for m in messages:
        out.append((f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n", False))
        out.append((m["content"].strip() + "<|eot_id|>", m.get("trained", False)))
    if generation_header:                        # 3.0 appends the header after every conversation
        out.append(("<|start_header_id|>assistant<|end_header_id|>\n\n", False))
    return out


def _qwen3(messages, train_reasoning: bool):
    out = []
    last_query = max(i for i, m in enumerate(messages) if m["role"] == "user")
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            out.append((f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n", False))
            continue
        content, thought = m["content"], m.get("reasoning_content")
        if thought is None:                     # a reply written "<think>...</think>answer" is split there
            thought = ""
            if "</think>" in content:
                thought = content.split("</think>")[0].rstrip("\n").split("<think>")[-1].lstrip("\n")
                content = content.split("</think>")[-1].lstrip("\n")
        trained = m.get("trained", False)
        out.append(("<|im_start|>assistant\n", False))
        if i > last_query and (i == len(messages) - 1 or thought):    # earlier turns lose their <think> block
            out.append(("<think>\n" + thought.strip("\n") + "\n</think>\n\n", trained and (train_reasoning or
                                                                                         not thought)))
            content = content.lstrip("\n")
        out.append((content + "<|im_end|>", trained))
        out.append(("\n", False))
    return out


def _gemma3(messages, train_reasoning: bool):
    out, prefix = [("<bos>", False)], ""
    if messages[0]["role"] == "system":         # folded into the first user turn
        prefix, messages = messages[0]["content"] + "\n\n", messages[1:]
    for i, m in enumerate(messages):
        role = "model" if m["role"] == "assistant" else m["role"]
        out.append((f"<start_of_turn>{role}\n" + (prefix if i == 0 else ""), False))
        out.append((m["content"].strip() + "<end_of_turn>", m.get("trained", False)))
        out.append(("\n", False))
    return out


def _deepseek_v3(messages, train_reasoning: bool):
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    out = [("<｜begin▁of▁sentence｜>" + system, False)]
    for m in messages:
        if m["role"] == "user":
            out.append(("<｜User｜>" + m["content"], False))
        elif m["role"] == "assistant":
            out.append(("<｜Assistant｜>", False))
            out.append((m["content"] + "<｜end▁of▁sentence｜>", m.get("trained", False)))
    return out


def reference(family: str, messages: list[dict], train_reasoning: bool = True) -> list[tuple[str, bool]]:
    """(text, trained) segments of the family's render of `messages`; a message with "trained": True is a turn
    whose tokens are trained (its header never is)."""
    if family in ("llama3", "llama3_1"):
        return _llama3(messages, family == "llama3", train_reasoning)
    return {"qwen3": _qwen3, "gemma3": _gemma3, "deepseek_v3": _deepseek_v3}[family](messages, train_reasoning)


def reference_tokens(family: str, segments) -> tuple[list[int], list[bool]]:
    """The ids and mask of the segments, each tokenized alone by the family's tokenizer.json."""
    ids, mask = [], []
    for text, trained in segments:
        piece = raw(family).encode(text, add_special_tokens=False).ids
        ids += piece
        mask += [trained] * len(piece)
    return ids, mask
