"""A student whose tokenizer extends the teacher's (the teacher's ids, merges and named ids, plus tokens of its own)
is accepted with one warning; any other difference is refused naming the first one. The teacher's side comes from
the cache's tokenizer.json, or for a cache written before caches carried it, from the teacher's directory."""

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from cache_format import TOKENIZER_NAME, CacheError, KdcacheError, open_cache
from tests.toy import build_tokenizer
from tests.helpers import kdcache
from tests.pipeline.test_capture import one_line_error
from trainer.config import TrainConfig
from trainer.student import Vocabulary, compare_vocabularies, load_student
from trainer.train import run_train

EXTRA = ["<x1>", "<x2>"]


def save_student(out: Path, tokenizer, tiny_models, rows: int | None = None) -> Path:
    """The tiny student's weights with `rows` output rows (default: len(tokenizer)) and `tokenizer`."""
    model = AutoModelForCausalLM.from_pretrained(tiny_models["student"])
    model.resize_token_embeddings(rows or len(tokenizer), mean_resizing=False)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def teacher_tokenizer(tiny_models):
    return AutoTokenizer.from_pretrained(tiny_models["teacher"])


@pytest.fixture(scope="module")
def extended(tiny_models, tmp_path_factory) -> Path:
    """The teacher's tokenizer + two added tokens + a new pad token (ids V..V+2); output rows to match."""
    tok = teacher_tokenizer(tiny_models)
    tok.add_tokens(EXTRA)
    tok.add_special_tokens({"pad_token": "<pad>"})
    return save_student(tmp_path_factory.mktemp("extended") / "student", tok, tiny_models)


def old_cache(toy_cache: Path, out: Path, teacher_path: str | None = None) -> Path:
    """toy_cache as written before caches carried tokenizer.json: no file, no manifest fields for it."""
    shutil.copytree(toy_cache, out)
    (out / TOKENIZER_NAME).unlink()
    m = json.loads((out / "manifest.json").read_text())
    del m["tokenizer"]["file_sha256"], m["tokenizer"]["named_ids"]
    if teacher_path is not None:
        m["teacher"]["path"] = teacher_path
    (out / "manifest.json").write_text(json.dumps(m))
    return out


def test_an_extended_student_evaluates_with_one_warning(toy_cache, extended, tiny_models):
    V = len(teacher_tokenizer(tiny_models))
    r = kdcache("eval", "--cache", toy_cache, "--student", extended, "--json", "--max-rows-per-domain", 2)
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("extends the teacher's") == 1, r.stderr
    assert f"student {extended}: its tokenizer extends the teacher's with 3 tokens (ids {V}..{V + 2}) that the " \
           f"teacher never predicts; the student learns to give them no mass" in r.stderr
    assert json.loads(r.stdout)["domains"].keys() == {"code", "data", "math", "prose"}


def test_an_extended_student_trains_its_own_tokens_too(toy_cache, extended, tiny_models, tmp_path, caplog):
    V = len(teacher_tokenizer(tiny_models))
    before = AutoModelForCausalLM.from_pretrained(extended).get_output_embeddings().weight.detach().clone()
    with caplog.at_level(logging.WARNING, logger="kdcache"):
        run_train(TrainConfig(cache=str(toy_cache), student=str(extended), out=str(tmp_path / "run"), steps=3,
                              batch_size=4, eval_rows=2, prefetch=1))
    assert sum("extends the teacher's with 3 tokens" in r.getMessage() for r in caplog.records) == 1
    final = tmp_path / "run" / "final"
    assert len(AutoTokenizer.from_pretrained(final)) == V + 3
    after = AutoModelForCausalLM.from_pretrained(final).get_output_embeddings().weight.detach()
    assert after.shape[0] == V + 3 and not torch.equal(after[V:], before[V:])    # in the student's softmax


def test_a_renamed_token_is_refused_naming_id_and_both_tokens(toy_cache, tiny_models, tmp_path):
    tok = teacher_tokenizer(tiny_models)
    d = json.loads(tok.backend_tokenizer.to_str())
    merges = [m.split(" ") if isinstance(m, str) else m for m in d["model"]["merges"]]
    used = {part for m in merges for part in m} | {"".join(m) for m in merges}
    i, old = min((i, t) for t, i in d["model"]["vocab"].items() if t not in used and i > 0)  # in no merge
    d["model"]["vocab"]["<renamed>"] = d["model"]["vocab"].pop(old)
    student = save_student(tmp_path / "renamed", tok, tiny_models)
    (student / "tokenizer.json").write_text(json.dumps(d))
    assert AutoTokenizer.from_pretrained(student).convert_ids_to_tokens(i) == "<renamed>"
    r = kdcache("eval", "--cache", toy_cache, "--student", student)
    line = one_line_error(r)
    assert f"student {student}: its tokenizer differs from the cache's teacher tokenizer at id {i}: teacher " \
           f"{old!r}, student '<renamed>' (a student must use the teacher's tokenizer, or extend it with tokens " \
           f"after id {len(tok) - 1}, or train with --cross-tokenizer)" in line, line


def test_a_shorter_tokenizer_is_refused(toy_cache, tiny_models, tmp_path):
    tok = build_tokenizer(tmp_path / "tok300", vocab_size=300)               # the same BPE run, stopped earlier
    student = save_student(tmp_path / "short", tok, tiny_models)
    teacher = teacher_tokenizer(tiny_models)
    with pytest.raises(KdcacheError, match=r"differs from the cache's teacher tokenizer at id 300: teacher "
                       rf"{teacher.convert_ids_to_tokens(300)!r}, the student's vocabulary ends at id 299"):
        load_student(str(student), open_cache(toy_cache), device="cpu")


def test_a_changed_eos_id_is_refused(toy_cache, tiny_models, tmp_path):
    tok = teacher_tokenizer(tiny_models)
    eos, V = tok.eos_token_id, len(tok)
    tok.add_special_tokens({"eos_token": "<|end|>"})                          # a new id V, the old one kept
    student = save_student(tmp_path / "eos", tok, tiny_models)
    line = one_line_error(kdcache("eval", "--cache", toy_cache, "--student", student))
    assert f"its tokenizer differs from the cache's teacher tokenizer in its eos id: teacher {eos}, student {V}" \
        in line, line


def test_an_extension_without_output_rows_for_it_is_refused(toy_cache, tiny_models, tmp_path):
    tok = teacher_tokenizer(tiny_models)
    V = len(tok)
    tok.add_tokens(EXTRA)
    student = save_student(tmp_path / "narrow", tok, tiny_models, rows=V)     # the teacher's V rows only
    line = one_line_error(kdcache("eval", "--cache", toy_cache, "--student", student))
    assert f"{student}: the student's output embedding has {V} rows, fewer than the cache's tokenizer vocabulary " \
           f"of {V} and than its tokenizer's {V + 2} tokens" in line, line


def test_a_corrupt_cache_tokenizer_is_named(toy_cache, extended, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(toy_cache, cache)
    with open(cache / TOKENIZER_NAME, "ab") as f:
        f.write(b" ")
    with pytest.raises(CacheError, match=rf"{cache / TOKENIZER_NAME}: sha256 mismatch"):
        load_student(str(extended), open_cache(cache), device="cpu")
    (cache / TOKENIZER_NAME).unlink()
    with pytest.raises(CacheError, match=rf"{cache / TOKENIZER_NAME}: missing"):
        load_student(str(extended), open_cache(cache), device="cpu")


def test_an_old_cache_without_tokenizer_json(toy_cache, extended, tiny_models, tmp_path, caplog):
    """Identical tokenizer: accepted as ever. Extended: the teacher's directory is the reference while it is there;
    without it the student is refused as before."""
    cache = open_cache(old_cache(toy_cache, tmp_path / "old"))
    assert cache.manifest.tokenizer.file_sha256 == "" and cache.tokenizer_json() is None
    r = kdcache("eval", "--cache", cache.root, "--student", tiny_models["student"], "--max-rows-per-domain", 2)
    assert r.returncode == 0 and "extends" not in r.stderr, r.stderr
    with caplog.at_level(logging.WARNING, logger="kdcache"):
        load_student(str(extended), cache, device="cpu")
    assert "extends the teacher's with 3 tokens" in caplog.text
    gone = open_cache(old_cache(toy_cache, tmp_path / "gone", teacher_path=str(tmp_path / "no-teacher")))
    V = len(teacher_tokenizer(tiny_models))
    with pytest.raises(KdcacheError, match=rf"{extended}: the student's tokenizer differs from the cache's teacher "
                       rf"tokenizer \(student vocab {V + 3}, teacher vocab {V}\)"):
        load_student(str(extended), gone, device="cpu")
    load_student(str(tiny_models["student"]), gone, device="cpu")             # identical: no reference needed


def test_compare_vocabularies():
    teacher = Vocabulary(tokens=["<e>", "a", "b", "ab"], merges=["a b"], named={"eos": 0, "bos": 0, "pad": None})
    same = {"merges": ["a b"], "named": {"eos": 0, "bos": 0, "pad": None}}
    assert compare_vocabularies(teacher, Vocabulary(tokens=list(teacher.tokens), **same)) == 0
    assert compare_vocabularies(teacher, Vocabulary(tokens=[*teacher.tokens, "<x>", None, "<y>"],
                                                    merges=["a b"], named={"eos": 0, "bos": 0, "pad": 4})) == 2
    assert compare_vocabularies(teacher, Vocabulary(tokens=["<e>", "a", "c", "ab"], **same)) == \
        "at id 2: teacher 'b', student 'c'"
    assert compare_vocabularies(teacher, Vocabulary(tokens=["<e>", "a"], **same)) == \
        "at id 2: teacher 'b', the student's vocabulary ends at id 1"
    assert compare_vocabularies(teacher, Vocabulary(tokens=["<e>", "a", None, "ab", "b"], **same)) == \
        "at id 2: teacher 'b', the student has no id 2"
    assert compare_vocabularies(teacher, Vocabulary(tokens=list(teacher.tokens), merges=["b a"],
                                                    named=same["named"])) == \
        "in its BPE merges at merge 0: teacher 'a b', student 'b a'"
    assert compare_vocabularies(teacher, Vocabulary(tokens=list(teacher.tokens), merges=[],
                                                    named=same["named"])) == \
        "in its BPE merges at merge 0: teacher 'a b', student none (it has 0 merges)"
    assert compare_vocabularies(teacher, Vocabulary(tokens=list(teacher.tokens), merges=["a b"],
                                                    named={"eos": 0, "bos": 3})) == \
        "in its bos id: teacher 0, student 3"
