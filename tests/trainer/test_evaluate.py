"""kdcache eval: load_student's checks and evaluate()'s per-domain report on a real (tiny) teacher cache."""

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from cache_format import (CacheError, DomainInfo, KdcacheError, Manifest, ShardWriter, SplitRule, TeacherInfo,
                          TokenizerInfo, TopkV1, open_cache, tokenizer_fingerprint, write_manifest)
from tests.toy import build_tokenizer, domain_texts
from trainer.evaluate import evaluate
from trainer.student import load_student

T = 24
ROWS = {"code": 3, "prose": 2}


def build_cache(cache_dir: Path, teacher_dir: Path, K: int, split: str = "val", rows: dict = ROWS) -> Path:
    """A real cache: the teacher's top-K log-probs (float32, HF) over packed rows of T tokens of toy text."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(teacher_dir)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    codec = TopkV1(top_k=K)
    domains = {}
    for domain, n in rows.items():
        ids = []
        for text in domain_texts(domain, 200):
            ids += tok(text)["input_ids"] + [tok.eos_token_id]
            if len(ids) >= n * T:
                break
        w = ShardWriter(cache_dir, f"{split}/{domain}/shard-00000.parquet", codec, row_group_rows=2)
        for i in range(n):
            input_ids = np.array(ids[i * T:(i + 1) * T], np.int32)                     # (T,)
            with torch.no_grad():
                logp = teacher(torch.from_numpy(input_ids).long()[None]).logits[0].log_softmax(-1)  # (T, V)
            lp, top = logp.topk(K, dim=-1)                                              # (T, K) sorted
            target = np.full(T, np.nan, np.float32)
            target[:-1] = logp[torch.arange(T - 1), torch.from_numpy(input_ids[1:]).long()].numpy()
            top, lp = top.numpy().astype(np.int32), lp.numpy().astype(np.float32)
            top[-1], lp[-1] = 0, -np.inf                                                # last position: none
            w.write({"row_index": i, "domain": domain, "input_ids": input_ids, "topk_ids": top,
                     "topk_logprobs": lp, "target_logprobs": target})
        shard = w.close()
        domains[domain] = DomainInfo(rows=shard.rows, tokens=shard.tokens, shards=[shard])
    manifest = Manifest(
        teacher=TeacherInfo(path=str(teacher_dir), name="teacher", fingerprint="0" * 64, engine="hf",
                            engine_version="test", logprobs_mode="raw_logprobs", dtype="float32"),
        tokenizer=TokenizerInfo(vocab_size=len(tok), fingerprint=tokenizer_fingerprint(tok), eos_id=tok.eos_token_id),
        top_k=K, seq_len=T, codec=codec.params(), split=SplitRule(rule="test", seed=0, val_fraction=0.5),
        splits={split: domains})
    write_manifest(cache_dir, manifest)
    return cache_dir


@pytest.fixture(scope="module")
def caches(tiny_models, tmp_path_factory):
    """A K=8 cache and a K=V cache (full teacher distribution) of the tiny teacher, val split."""
    root = tmp_path_factory.mktemp("eval_caches")
    from transformers import AutoTokenizer
    V = len(AutoTokenizer.from_pretrained(tiny_models["teacher"]))
    return {"k8": build_cache(root / "k8", tiny_models["teacher"], K=8),
            "full": build_cache(root / "full", tiny_models["teacher"], K=V)}


def test_report_shape_and_json(caches, tiny_models):
    cache = open_cache(caches["k8"])
    model, _ = load_student(str(tiny_models["student"]), cache.manifest, device="cpu")
    report = evaluate(cache, model, split="val", batch_size=2)
    json.dumps(report)
    assert set(report) == {"split", "domains", "mean"} and report["split"] == "val"
    assert sorted(report["domains"]) == sorted(ROWS)
    for d, stats in report["domains"].items():
        assert set(stats) == {"tokens", "student_ce", "teacher_ce", "kl", "ppl"}
        assert stats["tokens"] == ROWS[d] * (T - 1)
        assert stats["kl"] > 0 and math.isclose(stats["ppl"], math.exp(stats["student_ce"]))
    assert report["mean"]["tokens"] == sum(ROWS.values()) * (T - 1)
    for key in ("student_ce", "teacher_ce", "kl", "ppl"):
        assert math.isclose(report["mean"][key], np.mean([s[key] for s in report["domains"].values()]))
    # batch size and order do not change the numbers; max_rows_per_domain limits rows
    again = evaluate(cache, model, batch_size=3)
    for d in ROWS:
        for key in ("student_ce", "teacher_ce", "kl"):
            assert math.isclose(again["domains"][d][key], report["domains"][d][key], rel_tol=1e-5)
    limited = evaluate(cache, model, max_rows_per_domain=1)
    assert all(s["tokens"] == T - 1 for s in limited["domains"].values())


def test_teacher_as_student_on_full_cache_has_zero_kl(caches, tiny_models):
    cache = open_cache(caches["full"])
    model, _ = load_student(str(tiny_models["teacher"]), cache.manifest, device="cpu")
    report = evaluate(cache, model, batch_size=2)
    for stats in report["domains"].values():
        assert abs(stats["kl"]) < 1e-4
        assert stats["student_ce"] == pytest.approx(stats["teacher_ce"], abs=1e-4)


def test_student_ce_matches_hf_loss(caches, tiny_models):
    cache = open_cache(caches["k8"])
    model, _ = load_student(str(tiny_models["student"]), cache.manifest, device="cpu")
    report = evaluate(cache, model, batch_size=2)
    for domain in ROWS:
        ids = torch.stack([torch.tensor(r["input_ids"], dtype=torch.long) for r in cache.iter_rows("val", domain)])
        with torch.no_grad():
            loss = model(input_ids=ids, labels=ids).loss.item()       # HF shifts labels internally
        assert report["domains"][domain]["student_ce"] == pytest.approx(loss, rel=1e-5)


def test_foreign_tokenizer_is_refused(caches, tiny_models, tmp_path):
    from transformers import AutoTokenizer

    student = tmp_path / "foreign"
    shutil.copytree(tiny_models["student"], student)
    for f in student.glob("*token*"):
        f.unlink()
    build_tokenizer(student, vocab_size=300)
    with pytest.raises(KdcacheError, match="tokenizer differs from the cache's teacher tokenizer") as e:
        load_student(str(student), open_cache(caches["k8"]).manifest, device="cpu")
    teacher = AutoTokenizer.from_pretrained(tiny_models["student"])    # the same BPE run, 300 ids: a prefix
    token = teacher.convert_ids_to_tokens(300)
    assert f"at id 300: teacher {token!r}, the student's vocabulary ends at id 299" in str(e.value)
    assert f"extend it with tokens after id {len(teacher) - 1}, or train with --cross-tokenizer)" in str(e.value)


def test_padded_embedding_student_works(caches, tiny_models, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    student = tmp_path / "padded"
    model = AutoModelForCausalLM.from_pretrained(tiny_models["student"])
    V = model.get_output_embeddings().weight.shape[0]
    model.resize_token_embeddings(V + 64)
    model.save_pretrained(student)
    AutoTokenizer.from_pretrained(tiny_models["student"]).save_pretrained(student)
    cache = open_cache(caches["k8"])
    padded, _ = load_student(str(student), cache.manifest, device="cpu")
    assert padded.get_output_embeddings().weight.shape[0] == V + 64
    report = evaluate(cache, padded, batch_size=2)
    assert all(math.isfinite(v) for s in report["domains"].values() for k, v in s.items())


def test_too_few_output_rows_is_refused(caches, tiny_models, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    student = tmp_path / "small"
    model = AutoModelForCausalLM.from_pretrained(tiny_models["student"])
    model.resize_token_embeddings(model.get_output_embeddings().weight.shape[0] - 10)
    model.save_pretrained(student)
    AutoTokenizer.from_pretrained(tiny_models["student"]).save_pretrained(student)
    with pytest.raises(KdcacheError, match="fewer than the cache's tokenizer vocabulary"):
        load_student(str(student), open_cache(caches["k8"]).manifest, device="cpu")


def test_missing_or_bad_paths(caches, tiny_models, tmp_path):
    manifest = open_cache(caches["k8"]).manifest
    with pytest.raises(KdcacheError, match="does not exist"):
        load_student(str(tmp_path / "nope"), manifest)
    (tmp_path / "empty").mkdir()
    with pytest.raises(KdcacheError, match="not a model directory"):
        load_student(str(tmp_path / "empty"), manifest)
    no_tok = tmp_path / "no_tok"
    shutil.copytree(tiny_models["student"], no_tok)
    for f in no_tok.glob("*token*"):
        f.unlink()
    with pytest.raises(KdcacheError, match="tokenizer"):
        load_student(str(no_tok), manifest)


def test_corrupt_shard_names_it(caches, tiny_models, tmp_path):
    shutil.copytree(caches["k8"], tmp_path / "cache")
    shard = tmp_path / "cache" / "val" / "code" / "shard-00000.parquet"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    cache = open_cache(tmp_path / "cache")
    model, _ = load_student(str(tiny_models["student"]), cache.manifest, device="cpu")
    with pytest.raises(CacheError, match="shard-00000.parquet"):
        evaluate(cache, model)
    shard.write_bytes(bytes(data[:-100]))   # truncated: refused before any read
    with pytest.raises(CacheError, match=r"code/shard-00000.parquet.*truncated"):
        evaluate(open_cache(tmp_path / "cache"), model)


def test_empty_split_is_refused(caches, tiny_models):
    cache = open_cache(caches["k8"])
    model, _ = load_student(str(tiny_models["student"]), cache.manifest, device="cpu")
    with pytest.raises(KdcacheError, match="split 'train' has no rows"):
        evaluate(cache, model, split="train")
