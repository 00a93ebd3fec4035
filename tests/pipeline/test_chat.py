"""pipeline.chat: record formats, message validation and the trained-token mask of rendered conversations."""

import copy
import hashlib
import json

import pytest

from cache_format import KdcacheError
from pipeline.chat import (Example, check_messages, load_template, record_format, render, render_example,
                           render_pair, resolve_template, template_fingerprint, to_messages)
from tests.toy import build_tokenizer

# ChatML, rendering the same text with and without {% generation %} marks (content + <|im_end|> is generated).
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
CHATML_GEN = ("{% for m in messages %}{{ '<|im_start|>' + m.role + '\\n' }}"
              "{% if m.role == 'assistant' %}{% generation %}{{ m.content + '<|im_end|>' }}{% endgeneration %}"
              "{% else %}{{ m.content + '<|im_end|>' }}{% endif %}{{ '\\n' }}{% endfor %}"
              "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
# Marks the final message only: earlier renders are not prefixes of later ones.
UNSTABLE = ("{% for m in messages %}{{ '<|im_start|>' + m.role + '\\n' + m.content }}"
            "{% if loop.last %} !{% endif %}{{ '<|im_end|>\\n' }}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
# Marks the final message only when it is an assistant's (like templates that keep the reasoning of the last turn
# only): a turn's render is then no prefix of the whole conversation's.
UNSTABLE_LAST = ("{% for m in messages %}{{ '<|im_start|>' + m.role + '\\n' + m.content }}"
                 "{% if loop.last and m.role == 'assistant' %} !{% endif %}{{ '<|im_end|>\\n' }}{% endfor %}"
                 "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
# Appends the assistant header after every conversation (Llama 3.0 Instruct's way).
ALWAYS_HEADER = CHATML.replace("{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}",
                               "{{ '<|im_start|>assistant\\n' }}")
# Keep only the last assistant turn; rewrite every reply (spaces -> "_").
DROPS_EARLIER = CHATML.replace("{% for m in messages %}", "{% for m in messages %}{% if m.role != 'assistant' or "
                               "loop.last %}").replace("{% endfor %}", "{% endif %}{% endfor %}")
REWRITES = CHATML.replace("m.content", "(m.content | replace(' ', '_') if m.role == 'assistant' else m.content)")
TEMPLATES = {"prefix": CHATML, "generation": CHATML_GEN}

CHAT = [{"role": "system", "content": "the story"},
        {"role": "user", "content": "def f ( x ) :"},
        {"role": "assistant", "content": "return x"},
        {"role": "user", "content": "sum of 1 + 2"},
        {"role": "assistant", "content": "3 = 1 + 2"}]
WHERE = "data/chat.jsonl record 17"


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    t = build_tokenizer(tmp_path_factory.mktemp("tok"))
    t.add_tokens(["<|im_start|>", "<|im_end|>"], special_tokens=True)
    return t


def chatml_text(messages) -> str:
    return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)


def trained_texts(tok, ids, trained) -> list[str]:
    """The decoded runs of trained tokens."""
    runs, cur = [], []
    for i, t in zip(ids, [*trained]):
        if t:
            cur.append(i)
        elif cur:
            runs, cur = runs + [cur], []
    runs += [cur] if cur else []
    return [tok.decode(r) for r in runs]


def one_line_error(exc_info, *parts):
    msg = str(exc_info.value)
    assert "\n" not in msg, msg
    for p in parts:
        assert p in msg, msg
    return msg


@pytest.mark.parametrize("kind", TEMPLATES)
def test_assistant_mask_is_the_assistant_spans(tok, kind):
    ids, trained = render(tok, CHAT, "assistant", WHERE, template=TEMPLATES[kind])
    assert len(ids) == len(trained)
    assert tok.decode(ids) == chatml_text(CHAT)
    assert trained_texts(tok, ids, trained) == ["return x<|im_end|>", "3 = 1 + 2<|im_end|>"]
    untrained = tok.decode([i for i, t in zip(ids, trained) if not t])
    assert untrained == chatml_text(CHAT).replace("return x<|im_end|>", "").replace("3 = 1 + 2<|im_end|>", "")


@pytest.mark.parametrize("train_on", ["assistant", "last-assistant", "all"])
def test_both_templates_give_the_same_tokens_and_mask(tok, train_on):
    a = render(tok, CHAT, train_on, WHERE, template=CHATML)
    b = render(tok, CHAT, train_on, WHERE, template=CHATML_GEN)
    assert a == b
    assert sum(a[1]) > 0


@pytest.mark.parametrize("kind", TEMPLATES)
def test_last_assistant_and_all(tok, kind):
    ids, trained = render(tok, CHAT, "last-assistant", WHERE, template=TEMPLATES[kind])
    assert trained_texts(tok, ids, trained) == ["3 = 1 + 2<|im_end|>"]
    ids_all, trained_all = render(tok, CHAT, "all", WHERE, template=TEMPLATES[kind])
    assert ids_all == ids and all(trained_all)


def test_tokenizer_template_is_used_and_missing_one_is_refused(tok):
    with pytest.raises(KdcacheError) as e:
        render(tok, CHAT, "assistant", WHERE)
    one_line_error(e, WHERE, "has no chat template; pass --chat-template FILE")
    t = copy.deepcopy(tok)
    t.chat_template = CHATML_GEN
    assert render(t, CHAT, "assistant", WHERE) == render(tok, CHAT, "assistant", WHERE, template=CHATML)
    assert resolve_template(t, None, WHERE) == CHATML_GEN
    assert resolve_template(t, CHATML, WHERE) == CHATML  # --chat-template wins


@pytest.mark.parametrize("kind", TEMPLATES)
def test_conversation_without_assistant_turn_has_no_trained_token(tok, kind):
    msgs = CHAT[:2]
    ids, trained = render(tok, msgs, "assistant", WHERE, template=TEMPLATES[kind])
    assert tok.decode(ids) == chatml_text(msgs) and not any(trained)
    assert all(render(tok, msgs, "all", WHERE, template=TEMPLATES[kind])[1])


@pytest.mark.parametrize("kind", TEMPLATES)
def test_conversational_prompt_completion_trains_the_completion_only(tok, kind):
    rec = {"prompt": CHAT[:4], "completion": CHAT[4:]}
    ex = to_messages(rec, "prompt-completion", WHERE)
    assert ex == Example(messages=CHAT, first_trained=4)
    ids, trained = render_example(tok, ex, "assistant", WHERE, template=TEMPLATES[kind])
    assert tok.decode(ids) == chatml_text(CHAT)
    assert trained_texts(tok, ids, trained) == ["3 = 1 + 2<|im_end|>"]  # the prompt's assistant turn is context
    assert all(render_example(tok, ex, "all", WHERE, template=TEMPLATES[kind])[1])


def test_prompt_completion_strings(tok):
    ex = to_messages({"prompt": "def f ( x ) :", "completion": " return x", "text": None}, "prompt-completion", WHERE)
    assert ex == Example(prompt="def f ( x ) :", completion=" return x")
    ids, trained = render_example(tok, ex, "assistant", WHERE)
    assert ids == tok("def f ( x ) : return x", add_special_tokens=False)["input_ids"]
    assert tok.decode([i for i, t in zip(ids, trained) if t]) == " return x"
    assert tok.decode([i for i, t in zip(ids, trained) if not t]) == "def f ( x ) :"
    assert all(render_example(tok, ex, "all", WHERE)[1])


def test_prompt_completion_strings_merged_at_the_boundary(tok):
    prompt, completion = "x = ret", "urn x"  # " ret" + "urn" is the one token " return"
    ids, trained = render_pair(tok, prompt, completion, "assistant")
    head = tok(prompt, add_special_tokens=False)["input_ids"]
    assert ids == tok(prompt + completion, add_special_tokens=False)["input_ids"] and ids[:len(head)] != head
    assert trained[0] is False and trained[-1] is True and trained == sorted(trained)  # one untrained prefix
    trained_text = tok.decode([i for i, t in zip(ids, trained) if t])
    assert trained_text == " return x"  # the merged token holds completion text: trained
    assert tok.decode([i for i, t in zip(ids, trained) if not t]) + trained_text == prompt + completion


def test_record_format():
    assert record_format({"messages": CHAT, "text": "x"}, "text", WHERE) == "chat"
    assert record_format({"prompt": "a", "completion": "b"}, "text", WHERE) == "prompt-completion"
    assert record_format({"body": "a", "messages": None, "prompt": None}, "body", WHERE) == "text"
    assert record_format({"prompt": "a", "text": "t"}, "text", WHERE) == "text"
    with pytest.raises(KdcacheError) as e:
        record_format({"prompt": "a", "completion": None}, "text", WHERE)
    one_line_error(e, WHERE, "has 'prompt' but no 'completion'")
    with pytest.raises(KdcacheError) as e:
        record_format({"body": "a"}, "text", WHERE)
    one_line_error(e, WHERE, "no field 'text' (fields: body)", "'messages' or 'prompt' + 'completion'")


@pytest.mark.parametrize("messages, expected", [
    ("hi", "messages must be a non-empty list"),
    ([], "messages must be a non-empty list"),
    ([CHAT[0], "hi"], "messages[1] must be a {role, content} object, got 'hi'"),
    ([{"content": "x"}], "messages[0] has no 'role'"),
    ([{"role": "user", "content": None}], "messages[0] has no 'content'"),
    ([CHAT[0], CHAT[1], {"role": "bot", "content": "x"}],
     "messages[2].role 'bot' is not one of system, user, assistant, tool"),
    ([{"role": "user", "content": [{"type": "text", "text": "x"}]}], "messages[0].content must be a string, got list"),
    ([{"role": "user", "content": 3}], "messages[0].content must be a string, got int"),
])
def test_check_messages_refuses_bad_messages(messages, expected):
    with pytest.raises(KdcacheError) as e:
        check_messages(messages, WHERE)
    msg = one_line_error(e, expected)
    assert msg.startswith(WHERE + ": ")


def test_check_messages_drops_none_keys():
    msgs = [{"role": "user", "content": "x", "name": None}, {"role": "tool", "content": "y", "name": "calc"}]
    assert check_messages(msgs, WHERE) == [{"role": "user", "content": "x"},
                                           {"role": "tool", "content": "y", "name": "calc"}]


@pytest.mark.parametrize("record, fmt, expected", [
    ({"text": "x"}, "chat", "no 'messages' field"),
    ({"messages": [{"role": "bot", "content": "x"}]}, "chat", "messages[0].role 'bot' is not one of"),
    ({"prompt": "x"}, "prompt-completion", "no 'completion' field"),
    ({"prompt": "x", "completion": [CHAT[2]]}, "prompt-completion",
     "prompt and completion must both be strings or both be message lists, got str and list"),
    ({"prompt": CHAT[:2], "completion": [CHAT[1]]}, "prompt-completion",
     "completion[0].role 'user' must be 'assistant'"),
    ({"prompt": [{"role": "user"}], "completion": [CHAT[2]]}, "prompt-completion", "prompt[0] has no 'content'"),
    ({"prompt": CHAT[:2], "completion": []}, "prompt-completion", "completion must be a non-empty list"),
])
def test_to_messages_refuses_bad_records(record, fmt, expected):
    with pytest.raises(KdcacheError) as e:
        to_messages(record, fmt, WHERE)
    one_line_error(e, WHERE, expected)


@pytest.mark.parametrize("template, messages, expected", [
    (UNSTABLE, CHAT, ["return x<|im_end|>", "3 = 1 + 2 !<|im_end|>"]),
    (UNSTABLE, CHAT[:3], ["return x !<|im_end|>"]),
    (UNSTABLE_LAST, CHAT, ["return x<|im_end|>", "3 = 1 + 2 !<|im_end|>"]),
    (ALWAYS_HEADER, CHAT, ["return x<|im_end|>", "3 = 1 + 2<|im_end|>"]),
])
def test_templates_that_rewrite_earlier_turns_are_located_in_the_whole_render(tok, template, messages, expected):
    """Earlier renders are no prefixes of later ones (a mark on the last turn, a header appended regardless): each
    reply is found in the whole conversation's render, through its end-of-turn marker, and nothing after it."""
    ids, trained = render(tok, messages, "assistant", WHERE, template=template)
    assert trained_texts(tok, ids, trained) == expected
    ids, trained = render(tok, messages, "all", WHERE, template=template)
    assert all(trained)


@pytest.mark.parametrize("template", [DROPS_EARLIER, REWRITES])
def test_a_reply_the_template_drops_or_rewrites_is_refused(tok, template):
    with pytest.raises(KdcacheError) as e:
        render(tok, CHAT, "assistant", WHERE, template=template)
    one_line_error(e, WHERE, "messages[2] (assistant) is not in the chat template's render", "'return x'")
    ids, trained = render(tok, CHAT, "last-assistant", WHERE, template=DROPS_EARLIER)   # the kept turn is found
    assert trained_texts(tok, ids, trained) == ["3 = 1 + 2<|im_end|>"]


@pytest.mark.parametrize("kind", TEMPLATES)
def test_leading_assistant_turn(tok, kind):
    msgs = [CHAT[2], CHAT[3], CHAT[4]]
    ids, trained = render(tok, msgs, "assistant", WHERE, template=TEMPLATES[kind])
    assert trained_texts(tok, ids, trained) == ["return x<|im_end|>", "3 = 1 + 2<|im_end|>"]


@pytest.mark.parametrize("template, expected", [
    ("{{ raise_exception('no system turns here') }}", "no system turns here"),
    ("{% for m in messages %}", "TemplateSyntaxError"),
    ("{{ messages[0].content + 1 }}", "TypeError"),
])
def test_failing_template_is_one_line_error(tok, template, expected):
    with pytest.raises(KdcacheError) as e:
        render(tok, CHAT, "assistant", WHERE, template=template)
    one_line_error(e, WHERE, "the chat template failed", expected)


def test_generation_marks_that_mark_nothing_are_refused(tok):
    template = CHATML + "{% if false %}{% generation %}x{% endgeneration %}{% endif %}"
    with pytest.raises(KdcacheError) as e:
        render(tok, CHAT, "assistant", WHERE, template=template)
    one_line_error(e, WHERE, "marks no token of the assistant turns")


def test_bad_train_on(tok):
    with pytest.raises(KdcacheError, match="--train-on 'everything' is not one of"):
        render(tok, CHAT, "everything", WHERE, template=CHATML)
    with pytest.raises(KdcacheError, match="--train-on"):
        render_pair(tok, "a", "b", "everything")


def test_template_fingerprint_and_load(tmp_path):
    assert template_fingerprint(CHATML) == hashlib.sha256(CHATML.encode()).hexdigest()
    assert template_fingerprint(CHATML) != template_fingerprint(CHATML_GEN)
    (tmp_path / "t.jinja").write_text(CHATML)
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": CHATML_GEN}))
    (tmp_path / "bad.json").write_text(json.dumps({"other": 1}))
    assert load_template(str(tmp_path / "t.jinja")) == CHATML
    assert load_template(str(tmp_path / "chat_template.json")) == CHATML_GEN
    for name, expected in [("missing.jinja", "cannot read"), ("bad.json", "no 'chat_template' string")]:
        with pytest.raises(KdcacheError) as e:
            load_template(str(tmp_path / name))
        one_line_error(e, f"--chat-template {tmp_path / name}", expected)
