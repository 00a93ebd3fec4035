"""`kdcache capture` (HF engine, through the CLI) of tiny random teachers behind published tokenizers: a Qwen3
teacher on multi-turn and reasoning conversations (the cache's supervised positions equal the hand-written
reference, tests/real_families.py), a DeepSeek-V3 teacher that transformers 5 would tokenize without spaces (the
cache holds tokenizer.json's tokens), and a reasoning field that the template never renders (one Error line)."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from cache_format import open_cache, verify_cache
from tests.toy import build_family
from tests.helpers import kdcache
from tests.pipeline.test_real_templates import CASES, REASONED, marked
from tests.real_families import path, raw, reference, reference_tokens, tokenizer

pytestmark = pytest.mark.slow
CONVERSATIONS = [*CASES.values(), REASONED,
                 [CASES["single-turn"][0], {"role": "assistant", "content": "<think>\nOne word.\n</think>\n\nyes"}]]


def capture(teacher, data, out, *extra):
    args = ["capture", "--teacher", str(teacher), "--data", data, "--out", str(out), "--backend", "hf",
            "--top-k", "8", "--seq-len", "256", "--val-fraction", "0", "--batch-size", "4", *extra]
    return kdcache(*args)


def documents(rows) -> dict[tuple, list[bool]]:
    """{token ids of each document of isolated rows: its supervised flags}."""
    out = {}
    for row in rows:
        starts = [*np.flatnonzero(row["position_ids"] == 0), len(row["input_ids"])]
        for a, b in zip(starts[:-1], starts[1:]):
            out[tuple(int(i) for i in row["input_ids"][a:b])] = row["supervised"][a:b].tolist()
    return out


def write_chats(tmp_path, conversations):
    p = tmp_path / "chat.jsonl"
    p.write_text("".join(json.dumps({"messages": c}) + "\n" for c in conversations))
    return f"chat={p}"


# each family's teacher: a tiny random model of its architecture with rows for every id of its published tokenizer
ARCHITECTURES = {"llama3": ("llama3", None), "llama3_1": ("llama3", None), "qwen3": ("qwen2", None),
                 "gemma3": ("gemma3", 262_208), "deepseek_v3": ("llama3", 129_280)}


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """teacher(family): its directory, built once per module (the teachers are only read)."""
    root = tmp_path_factory.mktemp("teachers")

    def build(family: str) -> Path:
        out = root / family
        if not out.exists():
            architecture, vocab = ARCHITECTURES[family]
            build_family(out, architecture, tokenizer(family), hidden=64, layers=1, vocab_size=vocab)
            for f in ("tokenizer.json", "tokenizer_config.json"):                   # the files as published
                shutil.copy(path(family) / f, out / f)
        return out
    return build


def check_capture(cache_dir, family, conversations, train_reasoning=True):
    """The cache holds every conversation once, each supervised exactly where the reference trains."""
    verify_cache(cache_dir)
    expected = {}
    for messages in conversations:
        ids, mask = reference_tokens(family, reference(family, marked(messages, "assistant"), train_reasoning))
        expected[tuple(ids)] = mask
    seen = documents(open_cache(cache_dir).iter_rows("train"))
    for ids, supervised in seen.items():
        assert ids in expected, raw(family).decode(list(ids), skip_special_tokens=False)
        # position t holds the teacher's distribution over token t+1: supervised iff token t+1 is trained
        assert supervised == [*expected[ids][1:], False]
    assert sorted(seen) == sorted(expected)


@pytest.mark.parametrize("family", ["llama3", "llama3_1", "qwen3", "gemma3", "deepseek_v3"])
def test_chat_capture_supervises_the_reference_tokens(family, teacher, tmp_path):
    """Single-turn, multi-turn and system-prompt conversations (and, for Qwen3, reasoning) with each published
    template: the capture succeeds and its supervised positions are the reference's."""
    conversations = CONVERSATIONS if family == "qwen3" else list(CASES.values())
    r = capture(teacher(family), write_chats(tmp_path, conversations), tmp_path / "cache")
    assert r.returncode == 0, r.stderr
    check_capture(tmp_path / "cache", family, conversations)


def test_qwen3_reasoning_left_untrained(teacher, tmp_path):
    r = capture(teacher("qwen3"), write_chats(tmp_path, CONVERSATIONS), tmp_path / "cache",
                "--no-train-reasoning")
    assert r.returncode == 0, r.stderr
    check_capture(tmp_path / "cache", "qwen3", CONVERSATIONS, train_reasoning=False)
    assert open_cache(tmp_path / "cache").manifest.capture_config["train_reasoning"] is False


def test_deepseek_v3_capture_keeps_the_published_tokenization(teacher, tmp_path, caplog):
    """The cache's ids and tokenizer.json are the published tokenizer's, spaces included."""
    texts = ["Hello, world! The cache keeps every space.", "def f(x):\n    return x  # two spaces"]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    r = capture(teacher("deepseek_v3"), f"text={tmp_path / 't.jsonl'}", tmp_path / "cache",
                "--seq-len", "64",
                "--packing", "isolated")
    assert r.returncode == 0, r.stderr
    cache = open_cache(tmp_path / "cache")
    eos = raw("deepseek_v3").token_to_id("<｜end▁of▁sentence｜>")
    docs = sorted(documents(cache.iter_rows("train")))
    assert docs == sorted(tuple([*raw("deepseek_v3").encode(t, add_special_tokens=False).ids, eos]) for t in texts)
    assert cache.manifest.tokenizer.token_bytes == "byte-level"
    from tokenizers import Tokenizer
    assert Tokenizer.from_str(cache.tokenizer_json()).encode(texts[0]).tokens[:3] == ["Hello", ",", "Ġworld"]


def test_reasoning_the_template_never_renders_is_one_error_line(teacher, tmp_path):
    r = capture(teacher("deepseek_v3"), write_chats(tmp_path, [REASONED]), tmp_path / "cache")
    assert r.returncode == 1
    lines = [line for line in r.stderr.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1 and "chat.jsonl: record 1: messages[1].reasoning_content is not rendered" in lines[0], \
        r.stderr
    assert not (tmp_path / "cache" / "manifest.json").exists()
