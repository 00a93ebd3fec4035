"""The tiny local models every end-to-end test builds on: deterministic and loadable by transformers."""

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from cache_format import tokenizer_fingerprint
from tests.toy import build_tokenizer


def test_tiny_models_load_and_share_a_tokenizer(tiny_models):
    tok_t = AutoTokenizer.from_pretrained(tiny_models["teacher"])
    tok_s = AutoTokenizer.from_pretrained(tiny_models["student"])
    assert tokenizer_fingerprint(tok_t) == tokenizer_fingerprint(tok_s)
    ids = tok_t("def return if x", return_tensors="pt").input_ids
    teacher = AutoModelForCausalLM.from_pretrained(tiny_models["teacher"])
    with torch.no_grad():
        logits = teacher(ids).logits
    assert logits.shape == (1, ids.shape[1], len(tok_t))


def test_tokenizer_build_is_deterministic_and_fingerprint_sees_content(tmp_path):
    a, b = build_tokenizer(tmp_path / "a"), build_tokenizer(tmp_path / "b")
    assert tokenizer_fingerprint(a) == tokenizer_fingerprint(b)
    a.chat_template = "{{ messages }}"            # another chat template is the same tokenizer
    assert tokenizer_fingerprint(a) == tokenizer_fingerprint(b)
    c = build_tokenizer(tmp_path / "c", vocab_size=300)
    assert tokenizer_fingerprint(c) != tokenizer_fingerprint(b)
