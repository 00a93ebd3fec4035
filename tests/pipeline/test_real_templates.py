"""The published tokenizers and chat templates of Llama 3 / 3.1, Qwen3, Gemma 3 and DeepSeek-V3 (and gpt-oss's,
Llama 2's tokenizers): masks located in the whole render equal a hand-written reference (tests/real_families.py),
the tokenizer kdcache loads tokenizes as its tokenizer.json, and every family's ids stand for fixed bytes."""

import json
import logging

import pytest

from cache_format import KdcacheError
from cache_format.token_bytes import PROBE, probe_kind
from pipeline.chat import render
from tests.real_families import ALL, WITH_TEMPLATE, path, raw, reference, reference_tokens, tokenizer
from trainer.tokenizer import load_tokenizer

WHERE = "chat.jsonl record 3"
U1 = {"role": "user", "content": "Say the word assistant, please."}
A1 = {"role": "assistant", "content": "  assistant  "}                      # the header's word, with spaces to trim
U2 = {"role": "user", "content": "Now in French: naïve café — 日本語 😀\n\tdef f(): return [1, 2]"}
A2 = {"role": "assistant", "content": "Encore : assistant.\nDeux lignes, 12+345."}
SYSTEM = {"role": "system", "content": "You are terse.\nAnswer in one line."}
CASES = {"single-turn": [U1, A1], "multi-turn": [U1, A1, U2, A2], "system prompt": [SYSTEM, U1, A1, U2, A2]}


def marked(messages, train_on):
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return [dict(m, trained=m["role"] == "assistant" and (train_on == "assistant" or i == last))
            for i, m in enumerate(messages)]


def check_against_reference(family, messages, train_on="assistant", train_reasoning=True, template=None):
    """render() of the conversation equals the reference: same text, same ids, same trained mask."""
    tok = tokenizer(family)
    segments = reference(family, marked(messages, train_on), train_reasoning)
    text = "".join(t for t, _ in segments)
    assert tok.apply_chat_template(messages, tokenize=False) == text        # the reference is the published render
    ref_ids, ref_mask = reference_tokens(family, segments)
    assert ref_ids == raw(family).encode(text, add_special_tokens=False).ids  # its segments end at token ends
    ids, trained = render(tok, messages, train_on, WHERE, template, train_reasoning=train_reasoning)
    assert ids == ref_ids
    assert trained == ref_mask, [(raw(family).id_to_token(i), t, r) for i, t, r in zip(ids, trained, ref_mask)
                                 if t != r]
    return ids, trained


@pytest.mark.parametrize("train_on", ["assistant", "last-assistant"])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("family", WITH_TEMPLATE)
def test_masks_equal_the_reference(family, case, train_on):
    ids, trained = check_against_reference(family, CASES[case], train_on)
    assert any(trained)


REASONED = [U1, dict(A1, reasoning_content="The user wants one word.\nSay it."), U2,
            dict(A2, reasoning_content="\nFrench, then two lines.\n")]


@pytest.mark.parametrize("train_reasoning", [True, False])
@pytest.mark.parametrize("messages", [REASONED, [SYSTEM, U1, A1, U2, {"role": "assistant", "content":
                                      "<think>\nTwo lines in French.\n</think>\n\n" + A2["content"]}]],
                         ids=["reasoning_content", "inline-think"])
def test_qwen3_reasoning_follows_the_render(messages, train_reasoning):
    """Qwen3 drops earlier turns' <think> blocks and writes one for the last turn: the masks follow the render; the
    reasoning is trained with its reply unless train_reasoning is off."""
    ids, trained = check_against_reference("qwen3", messages, train_reasoning=train_reasoning)
    trained_text = raw("qwen3").decode([i for i, t in zip(ids, trained) if t], skip_special_tokens=False)
    assert ("French, then two lines." in trained_text or "Two lines in French." in trained_text) == train_reasoning
    assert "The user wants one word." not in raw("qwen3").decode(ids)       # the template dropped it: never seen


@pytest.mark.parametrize("family, key", [("llama3", "reasoning_content"), ("llama3_1", "reasoning_content"),
                                         ("gemma3", "reasoning_content"), ("deepseek_v3", "reasoning_content"),
                                         ("qwen3", "thinking")])      # Qwen3's template says enable_thinking only
def test_reasoning_on_a_template_that_ignores_it_is_refused(family, key):
    messages = [U1, {"role": "assistant", "content": "yes", key: "Say yes."}]
    with pytest.raises(KdcacheError) as e:
        render(tokenizer(family), messages, "assistant", WHERE)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(WHERE)
    assert f"messages[1].{key} is not rendered: the chat template never reads {key!r}" in msg


# gpt-oss's harmony format, as its template writes a reply with its analysis channel (the npm package ships no template)
HARMONY = ("{% for m in messages %}{% if m.role == 'assistant' %}<|start|>assistant{% if m.thinking is defined %}"
           "<|channel|>analysis<|message|>{{ m.thinking }}<|end|><|start|>assistant{% endif %}<|channel|>final"
           "<|message|>{{ m.content }}<|return|>{% else %}<|start|>{{ m.role }}<|message|>{{ m.content }}<|end|>"
           "{% endif %}{% endfor %}{% if add_generation_prompt %}<|start|>assistant{% endif %}")


@pytest.mark.parametrize("train_reasoning, expected", [
    (True, "<|channel|>analysis<|message|>Count the words.<|end|><|start|>assistant<|channel|>final<|message|>"
           "assistant<|return|>"),
    (False, "assistant<|return|>")])
def test_gpt_oss_thinking(train_reasoning, expected):
    tok = tokenizer("gptoss")
    msgs = [U1, dict(A1, content="assistant", thinking="Count the words.")]
    ids, trained = render(tok, msgs, "assistant", WHERE, HARMONY, train_reasoning=train_reasoning)
    assert raw("gptoss").decode([i for i, t in zip(ids, trained) if t], skip_special_tokens=False) == expected


@pytest.mark.parametrize("family", ALL)
def test_loaded_tokenizer_tokenizes_as_its_tokenizer_json(family):
    specials = [t.content for t in raw(family).get_added_tokens_decoder().values() if t.special][:8]
    text = PROBE + " ".join(specials) + " after  the specials\n\n" + PROBE
    assert tokenizer(family)(text, add_special_tokens=False)["input_ids"] == \
        raw(family).encode(text, add_special_tokens=False).ids


def test_deepseek_v3_is_read_from_its_tokenizer_json(caplog):
    """transformers 5 rebuilds DeepSeek-V3's byte-level BPE with a Metaspace pre-tokenizer (spaces vanish);
    kdcache warns once and uses tokenizer.json as published."""
    from transformers import AutoTokenizer

    expected = raw("deepseek_v3").encode("Hello, world", add_special_tokens=False).ids
    assert [raw("deepseek_v3").id_to_token(i) for i in expected] == ["Hello", ",", "Ġworld"]
    rebuilt = AutoTokenizer.from_pretrained(path("deepseek_v3"))("Hello, world", add_special_tokens=False)["input_ids"]
    with caplog.at_level(logging.WARNING, logger="kdcache"):
        ours = load_tokenizer(path("deepseek_v3"), "--teacher ds")
    assert ours("Hello, world", add_special_tokens=False)["input_ids"] == expected
    warned = [r.getMessage() for r in caplog.records if "tokenizes differently" in r.getMessage()]
    assert len(warned) == (rebuilt != expected)
    assert ours.eos_token == "<｜end▁of▁sentence｜>" and ours.bos_token == "<｜begin▁of▁sentence｜>"
    assert ours.chat_template == tokenizer("deepseek_v3").chat_template and ours.chat_template


def test_a_tokenizer_that_cannot_agree_with_its_tokenizer_json_is_refused(tmp_path):
    """A tokenizer_config.json naming an eos token that tokenizer.json lacks: every loader adds it."""
    from tests.toy import build_tokenizer

    build_tokenizer(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "eos_token": "<|not-in-the-file|>"}))
    with pytest.raises(KdcacheError) as e:
        load_tokenizer(tmp_path, f"--teacher {tmp_path}")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"--teacher {tmp_path}: the tokenizer transformers loads")
    assert "tokens vs" in msg and "in tokenizer.json" in msg


@pytest.mark.parametrize("family, kind", [("llama3", "byte-level"), ("llama3_1", "byte-level"),
                                          ("qwen3", "byte-level"), ("deepseek_v3", "byte-level"),
                                          ("gptoss", "byte-level"), ("gemma3", "metaspace"),
                                          ("llama2", "metaspace")])
def test_every_family_gives_its_text_back_byte_for_byte(family, kind):
    """What --cross-tokenizer needs (cache_format.token_bytes): Gemma 3's whitespace-run tokens read as spaces."""
    assert probe_kind(tokenizer(family), (path(family) / "tokenizer.json").read_text()) == kind


def test_a_word_level_tokenizer_declared_qwen2_is_read_from_its_tokenizer_json(tmp_path, caplog):
    """transformers 5 loads a word-level tokenizer.json declared `Qwen2Tokenizer` as a BPE with an added
    `<|endoftext|>` (and "hello world" as no tokens): kdcache reads tokenizer.json, with one warning."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["<eos>", "<unk>", "hello", "world"])},
                                       unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=words, eos_token="<eos>", unk_token="<unk>").save_pretrained(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "tokenizer_class": "Qwen2Tokenizer"}))
    with caplog.at_level(logging.WARNING, logger="kdcache"):
        tok = load_tokenizer(tmp_path, "--teacher words")
    assert len(tok) == 4 and tok("hello world", add_special_tokens=False)["input_ids"] == [2, 3]
    assert sum("tokenizes differently from its tokenizer.json" in r.getMessage() for r in caplog.records) == 1
