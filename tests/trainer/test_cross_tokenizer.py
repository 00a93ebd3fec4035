"""Cross-tokenizer distillation: token bytes, the vocabulary map, byte-span alignment, student rows, the chunk
likelihood loss, a zero-loss step through a permuted tokenizer, and the refusals."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from cache_format import KdcacheError, open_cache
from cache_format.fingerprint import named_ids, tokenizer_json
from cache_format.token_bytes import PROBE, probe_kind, token_bytes
from tests.toy import build_llama, build_tokenizer, write_toy_corpus
from trainer.cross_tokenizer import StudentRows, align, vocab_map
from trainer.losses import chunk_likelihood_kl


def _fast(spec: dict, out: Path, **special):
    from transformers import PreTrainedTokenizerFast

    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.json").write_text(json.dumps(spec))
    tok = PreTrainedTokenizerFast(tokenizer_file=str(out / "tokenizer.json"), **special)
    tok.save_pretrained(out)
    return tok


def metaspace_tokenizer(out: Path):
    """A hand-built SentencePiece-style BPE (Llama 2's layout): <unk> <s> </s>, 256 byte-fallback tokens, a few
    letters and merges ("▁the", "▁cat"); "▁" marks a space, and a prefix space is added to each text."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for piece in ["▁", *"abcdefghijklmnopqrstuvwxyz.,", "▁t", "he", "▁the", "▁c", "at", "▁cat"]:
        vocab[piece] = len(vocab)
    merges = [["▁", "t"], ["h", "e"], ["▁t", "he"], ["▁", "c"], ["a", "t"], ["▁c", "at"]]
    spec = {"version": "1.0", "truncation": None, "padding": None,
            "added_tokens": [{"id": i, "content": c, "single_word": False, "lstrip": False, "rstrip": False,
                              "normalized": False, "special": True} for c, i in (("<unk>", 0), ("<s>", 1),
                                                                                 ("</s>", 2))],
            "normalizer": None, "post_processor": None,
            "pre_tokenizer": {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first", "split": False},
            "decoder": {"type": "Sequence", "decoders": [
                {"type": "Replace", "pattern": {"String": "▁"}, "content": " "}, {"type": "ByteFallback"},
                {"type": "Fuse"}, {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
            "model": {"type": "BPE", "dropout": None, "unk_token": "<unk>", "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": True, "ignore_merges": False,
                      "vocab": vocab, "merges": merges}}
    return _fast(spec, out, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def permuted_tokenizer(tokenizer, out: Path, seed: int = 0):
    """The same tokenizer with its non-special ids shuffled (same merges and strings, other ids); the map old->new."""
    spec = json.loads(tokenizer_json(tokenizer))
    vocab = spec["model"]["vocab"]
    special = {t["id"] for t in spec["added_tokens"]}
    free = sorted(i for i in vocab.values() if i not in special)
    new = dict(zip(free, np.random.default_rng(seed).permutation(free).tolist()))
    spec["model"]["vocab"] = {t: new.get(i, i) for t, i in vocab.items()}
    perm = np.array([new.get(i, i) for i in range(len(tokenizer))])
    return _fast(spec, out, eos_token=tokenizer.eos_token, bos_token=tokenizer.bos_token), perm


@pytest.fixture(scope="module")
def tokenizers(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("tokenizers")
    from transformers import AutoTokenizer
    return {"teacher": AutoTokenizer.from_pretrained(tiny_models["tokenizer"]),
            "bpe600": build_tokenizer(root / "bpe600", vocab_size=600),
            "metaspace": metaspace_tokenizer(root / "metaspace")}


def teacher_row(tok, pieces: list, K: int = 4, seed: int = 0) -> dict:
    """A reader row of the teacher's ids for pieces (texts, or ints: ids as they are), top-k drawn at random,
    every position but the last holding a distribution (log p = -1 for each target)."""
    ids = []
    for p in pieces:
        ids += [p] if isinstance(p, int) else tok(p, add_special_tokens=False)["input_ids"]
    T, rng = len(ids), np.random.default_rng(seed)
    lps = np.log(np.full((T, K), 0.2, np.float32))
    lps[-1] = -np.inf
    return {"row_index": 0, "domain": "d", "input_ids": np.array(ids, np.int32),
            "topk_ids": np.concatenate([np.roll(ids, -1)[:, None], rng.integers(0, len(tok), (T, K - 1))], 1),
            "topk_logprobs": lps, "target_logprobs": np.append(np.full(T - 1, -1.0), np.nan).astype(np.float32),
            "supervised": np.arange(T) < T - 1, "position_ids": np.arange(T)}


def student_rows(teacher, student, max_len: int = 1 << 30) -> StudentRows:
    return StudentRows(token_bytes(tokenizer_json(teacher)), named_ids(teacher), student, max_len)


def spans(table, ids) -> list[bytes]:
    return [table.pieces[i] for i in ids]


# ---------------------------------------------------------------------------------------------- token bytes, map

def test_token_bytes_of_both_kinds(tokenizers):
    teacher, meta = tokenizers["teacher"], tokenizers["metaspace"]
    assert probe_kind(teacher, tokenizer_json(teacher)) == "byte-level"
    assert probe_kind(meta, tokenizer_json(meta)) == "metaspace"
    table = token_bytes(tokenizer_json(teacher))
    assert table.join(teacher(PROBE, add_special_tokens=False)["input_ids"]) == PROBE.encode()   # byte for byte
    meta_table = token_bytes(tokenizer_json(meta))
    assert meta_table.pieces[3 + 0xE6] == b"\xe6" and meta_table.fallback[3 + 0xE6]
    assert meta_table.pieces[meta.convert_tokens_to_ids("▁the")] == b" the"
    assert meta_table.pieces[0] is None and meta_table.special[2]                  # <unk>: no bytes; </s> special


def test_a_tokenizer_that_loses_text_is_not_byte_exact(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    wp = Tokenizer(models.WordPiece({"[UNK]": 0, "hello": 1, "world": 2, "##s": 3}, unk_token="[UNK]"))
    wp.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=wp, unk_token="[UNK]", eos_token="[UNK]")
    assert probe_kind(tok, tokenizer_json(tok)) == ""


def test_vocab_map(tokenizers):
    teacher, bpe, meta = tokenizers["teacher"], tokenizers["bpe600"], tokenizers["metaspace"]
    tt, bt, mt = (token_bytes(tokenizer_json(t)) for t in (teacher, bpe, meta))
    m = vocab_map(tt, bt, named_ids(teacher), named_ids(bpe))
    ok = np.flatnonzero(m >= 0)
    assert len(ok) == len(teacher)                     # the 600-id BPE holds every piece of the 384-id one
    assert all(tt.pieces[i] == bt.pieces[m[i]] for i in ok if not tt.special[i])
    m = vocab_map(tt, mt, named_ids(teacher), named_ids(meta))
    assert m[teacher.eos_token_id] == meta.eos_token_id                  # by role: <|eos|> -> </s>
    space = teacher.convert_tokens_to_ids("Ġ")
    assert m[space] == meta.convert_tokens_to_ids("▁")                   # " " is "▁", not <0x20>
    byte = next(i for i, p in enumerate(tt.pieces) if p == b"\xe6")
    assert m[byte] == 3 + 0xE6                                           # only the fallback has it
    assert (m[[i for i, p in enumerate(tt.pieces) if p is not None and len(p) > 1 and p.isalpha()
               and mt.pieces.count(p) == 0]] == -1).all()                # pieces the student lacks: unmapped


# ---------------------------------------------------------------------------------------------- alignment

def test_align_hand_built():
    # teacher |def| f|(x|):|  student |de|f| f|(|x|):|
    t_chunk, s_chunk, C = align(np.array([3, 5, 8, 10]), np.array([2, 3, 5, 6, 8, 10]))
    assert C == 4 and t_chunk.tolist() == [0, 1, 2, 3] and s_chunk.tolist() == [0, 0, 1, 2, 2, 3]
    # a token of no bytes joins its chunk; teacher bytes past the student's last token are no chunk (C)
    t_chunk, s_chunk, C = align(np.array([2, 2, 4, 7]), np.array([2, 4, 5]))
    assert C == 2 and t_chunk.tolist() == [0, 0, 1, 2] and s_chunk.tolist() == [0, 1, 2]


def _check_aligned_positions(sr: StudentRows, row: dict, out: dict, skipped: int = 0):
    """Every exactly aligned student position: its next token has the bytes of a teacher token whose context ends
    at the same byte, and its top-k is the teacher's mapped. skipped: teacher bytes before the student's first."""
    teacher, student = sr.teacher, sr.student
    t_text = [teacher.pieces[i] for i in row["input_ids"]]
    s_text = [student.pieces[i] for i in out["input_ids"]]
    t_ends = np.cumsum([len(p) for p in t_text])
    s_ends = skipped + np.cumsum([len(p) for p in s_text])
    for s in np.flatnonzero(out["supervised"]):
        j = int(np.flatnonzero(t_ends == s_ends[s])[-1]) + 1           # the teacher token after the same byte
        assert t_text[j] == s_text[s + 1]
        live = np.isfinite(out["topk_logprobs"][s])
        assert set(out["topk_ids"][s][live]) <= set(sr.vocab_map[row["topk_ids"][j - 1]])
        assert out["target_logprobs"][s] == row["target_logprobs"][j - 1]


def test_merges_that_differ(tokenizers):
    teacher, bpe = tokenizers["teacher"], tokenizers["bpe600"]
    sr = student_rows(teacher, bpe)
    row = teacher_row(teacher, ["def f(x): return x + 1 while the story said"])
    out = sr(row)
    assert b"".join(spans(sr.student, out["input_ids"])) == b"".join(spans(sr.teacher, row["input_ids"]))
    assert out["input_ids"].tolist() == bpe("def f(x): return x + 1 while the story said",
                                            add_special_tokens=False)["input_ids"]
    assert len(out["input_ids"]) < len(row["input_ids"])          # more merges: fewer tokens
    assert 0 < out["supervised"].sum() < out["trained"].sum() == len(out["input_ids"]) - 1
    _check_aligned_positions(sr, row, out)
    last = np.flatnonzero(np.isfinite(out["chunk_logprob"]))      # unaligned chunks: the teacher's log p summed
    assert len(last) and (out["chunk_logprob"][last] <= -2.0).all()
    assert not (out["supervised"] & (out["chunk_id"] >= 0)).any()


def test_teacher_ids_past_its_tokenizer_join_the_tail(tokenizers):
    """A teacher's output rows past its tokenizer (Qwen: 151,936 rows, 151,669 tokens) can reach its top-k: they
    stand for no text, so their mass stays in the tail."""
    teacher, bpe = tokenizers["teacher"], tokenizers["bpe600"]
    sr = student_rows(teacher, bpe)
    row = teacher_row(teacher, ["def f(x): return x + 1 while the story said"])
    row["topk_ids"][:, 1] = len(teacher) + 7
    out = sr(row)
    at = np.flatnonzero(out["supervised"])
    assert len(at) and np.isinf(out["topk_logprobs"][at, 1]).all() and np.isfinite(out["topk_logprobs"][at, 0]).all()


def test_byte_fallback_multibyte_and_roles(tokenizers):
    teacher, meta = tokenizers["teacher"], tokenizers["metaspace"]
    sr = student_rows(teacher, meta)
    row = teacher_row(teacher, ["the cat 日本", teacher.eos_token_id, "the cat"])
    out = sr(row)
    ids = out["input_ids"].tolist()
    assert meta.convert_ids_to_tokens(ids) == ["▁the", "▁cat", "▁", "<0xE6>", "<0x97>", "<0xA5>", "<0xE6>",
                                               "<0x9C>", "<0xAC>", "</s>", "▁the", "▁cat"]
    aligned = [meta.convert_ids_to_tokens(ids[s + 1]) for s in np.flatnonzero(out["supervised"])]
    # the teacher reads |t|he|Ġ|c|at|Ġ| and the six bytes of 日本, <|eos|>, |t|he|Ġ|c|at|: the space, each byte
    # of 日本 (byte-fallback tokens) and the EOS (by role) align; "▁cat" is the chunk |Ġ|c|at| (log p -3)
    assert aligned == ["▁", "<0xE6>", "<0x97>", "<0xA5>", "<0xE6>", "<0x9C>", "<0xAC>", "</s>"]
    assert out["chunk_logprob"][[0, 10]].tolist() == [-3.0, -3.0] and out["chunk_id"][0] == out["chunk_id"][0]
    assert out["trained"][:-1].all()


def test_row_cut_inside_a_character(tokenizers):
    teacher, bpe = tokenizers["teacher"], tokenizers["bpe600"]
    ids = teacher("日本 the story", add_special_tokens=False)["input_ids"]
    row = teacher_row(teacher, ids[1:])                                  # starts with a continuation byte
    sr = student_rows(teacher, bpe)
    out = sr(row)
    text = b"".join(spans(sr.student, out["input_ids"]))
    assert text == "本 the story".encode()                              # the cut character is left out
    _check_aligned_positions(sr, row, out, skipped=2)
    assert out["supervised"].sum() >= 3


def test_unmapped_special_is_read_as_text(tokenizers, tmp_path):
    teacher = build_tokenizer(tmp_path / "t", vocab_size=384)
    teacher.add_special_tokens({"additional_special_tokens": ["<|user|>"]})
    user = teacher.convert_tokens_to_ids("<|user|>")
    sr = student_rows(teacher, tokenizers["bpe600"])
    assert sr.vocab_map[user] == -1
    out = sr(teacher_row(teacher, ["the", user, "story"]))
    assert b"".join(spans(sr.student, out["input_ids"])) == b"the<|user|>story"


def test_only_trained_bytes_are_trained(tokenizers):
    """A chat row trains on its reply only: the student's CE and KD positions predict reply bytes only."""
    teacher, bpe = tokenizers["teacher"], tokenizers["bpe600"]
    prompt = teacher("the story said x", add_special_tokens=False)["input_ids"]
    reply = teacher(" def f(x): return", add_special_tokens=False)["input_ids"]
    row = teacher_row(teacher, prompt + reply + [teacher.eos_token_id])
    keep = np.arange(len(row["input_ids"])) >= len(prompt) - 1          # positions predicting the reply and EOS
    keep[-1] = False
    row["supervised"] = keep
    row["topk_logprobs"][~keep] = -np.inf
    sr = student_rows(teacher, bpe)
    out = sr(row)
    ids = out["input_ids"]
    trained_text = b"".join(sr.student.pieces[i] for i in ids[1:][out["trained"][:-1]])
    assert trained_text == b" def f(x): return" + teacher.eos_token.encode()
    assert not (out["supervised"] & ~out["trained"]).any() and not (out["chunk_id"][~out["trained"]] >= 0).any()


def test_isolated_documents_restart_positions(tokenizers):
    teacher, bpe = tokenizers["teacher"], tokenizers["bpe600"]
    a = teacher("the story said", add_special_tokens=False)["input_ids"] + [teacher.eos_token_id]
    b = teacher("def f(x): return", add_special_tokens=False)["input_ids"] + [teacher.eos_token_id]
    row = teacher_row(teacher, a + b)
    row["position_ids"] = np.concatenate([np.arange(len(a)), np.arange(len(b))])
    row["supervised"][len(a) - 1] = False                               # a document's last token
    row["topk_logprobs"][len(a) - 1] = -np.inf
    out = student_rows(teacher, bpe)(row)
    n_a = len(bpe("the story said", add_special_tokens=False)["input_ids"]) + 1
    assert out["position_ids"].tolist() == [*range(n_a), *range(len(out["input_ids"]) - n_a)]
    assert not out["trained"][n_a - 1] and out["trained"][n_a]          # nothing predicted across documents


def test_same_tokenizer_rows_are_the_teacher_rows(toy_cache, tiny_models):
    from transformers import AutoTokenizer

    cache = open_cache(toy_cache)
    sr = StudentRows.for_cache(cache, AutoTokenizer.from_pretrained(tiny_models["student"]), 1 << 30)
    for row in list(cache.iter_rows("train", "code"))[:20]:
        out = sr(row)
        assert out["input_ids"].tolist() == row["input_ids"].tolist()
        assert out["supervised"].tolist() == row["supervised"].tolist() == out["trained"].tolist()
        keep = row["supervised"]
        np.testing.assert_array_equal(out["topk_ids"][keep], row["topk_ids"][keep])
        np.testing.assert_array_equal(out["topk_logprobs"][keep], row["topk_logprobs"][keep])
        assert (out["chunk_id"] == -1).all()


def test_student_rows_cut_at_max_len(tokenizers):
    teacher, bpe = tokenizers["teacher"], tokenizers["bpe600"]
    row = teacher_row(teacher, ["def f(x): return x + 1 while the story said it was"])
    full = student_rows(teacher, bpe)(row)
    cut = student_rows(teacher, bpe, max_len=6)(row)
    assert len(cut["input_ids"]) == 6 and cut["input_ids"].tolist() == full["input_ids"][:6].tolist()
    assert not cut["trained"][-1] and not cut["supervised"][-1] and cut["chunk_id"][-1] == -1
    assert cut["supervised"][:5].tolist() == full["supervised"][:5].tolist()


# ---------------------------------------------------------------------------------------------- the chunk loss

def test_chunk_likelihood_kl():
    ce = torch.tensor([0.5, 0.7, 0.2, 1.0, 0.3], requires_grad=True)      # -log q of each position's next token
    chunk_id = torch.tensor([0, 0, -1, 3, 3])
    lp = torch.full((5,), float("nan"))
    lp[1], lp[4] = -1.2, -2.0                                            # q(chunk 0) = e^-1.2: equal to p
    kl, last = chunk_likelihood_kl(ce, chunk_id, lp)
    assert last.tolist() == [False, True, False, False, True]
    assert abs(kl[1].item()) < 1e-6                                     # zero where the student matches
    p, q = np.exp(-2.0), np.exp(-1.3)
    assert kl[4].item() == pytest.approx(p * np.log(p / q) + (1 - p) * np.log((1 - p) / (1 - q)), rel=1e-5)
    kl.sum().backward()
    assert ce.grad[3] < 0 and ce.grad[4] < 0                            # q too high: raise the student's CE
    assert ce.grad[2] == 0


# ---------------------------------------------------------------------------------------------- training

@pytest.fixture(scope="module")
def exact_cache(tiny_models, tmp_path_factory) -> Path:
    """The tiny teacher's exact (codec v1) top-16 over the toy domains."""
    from pipeline.capture import run_capture
    from pipeline.config import CaptureConfig

    root = tmp_path_factory.mktemp("exact")
    specs = write_toy_corpus(root / "corpus", 30, seed=5)
    run_capture(CaptureConfig(teacher=str(tiny_models["teacher"]), data=tuple(specs), out=str(root / "cache"),
                              backend="hf", top_k=16, seq_len=32, val_fraction=0.2, codec="v1"))
    return root / "cache"


def _permuted_teacher(tiny_models, out: Path, reorder: bool = True) -> Path:
    """The teacher's weights behind a permuted copy of its tokenizer: the same distribution over strings, other
    ids (reorder=False: the weights left in the old order, a student that does not match)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok, perm = permuted_tokenizer(AutoTokenizer.from_pretrained(tiny_models["teacher"]), out)
    model = AutoModelForCausalLM.from_pretrained(tiny_models["teacher"])
    if reorder:
        with torch.no_grad():
            inverse = torch.as_tensor(np.argsort(perm))                  # new id -> old id
            model.get_input_embeddings().weight.copy_(model.get_input_embeddings().weight[inverse])
            model.get_output_embeddings().weight.copy_(model.get_output_embeddings().weight[inverse])
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def test_zero_loss_through_a_permuted_tokenizer(exact_cache, tiny_models, tmp_path):
    from trainer.config import TrainConfig
    from trainer.evaluate import EvalConfig, run_eval
    from trainer.train import run_train

    student = _permuted_teacher(tiny_models, tmp_path / "student")
    with pytest.raises(KdcacheError, match="--cross-tokenizer"):
        run_train(TrainConfig(cache=str(exact_cache), student=str(student), out=str(tmp_path / "refused"), steps=1))
    run_train(TrainConfig(cache=str(exact_cache), student=str(student), out=str(tmp_path / "run"), steps=1,
                          batch_size=4, lr=1e-9, cross_tokenizer=True, eval_rows=0))
    first = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["kd_loss"] < 1e-5 and all(v == 1.0 for v in first["aligned_share"].values())
    report = run_eval(EvalConfig(cache=str(exact_cache), student=str(student), cross_tokenizer=True))
    assert report["mean"]["kl"] < 1e-5 and report["mean"]["aligned_share"] == 1.0
    assert report["mean"]["student_ce"] == pytest.approx(report["mean"]["teacher_ce"], abs=1e-4)

    wrong = _permuted_teacher(tiny_models, tmp_path / "wrong", reorder=False)     # the check can fail
    report = run_eval(EvalConfig(cache=str(exact_cache), student=str(wrong), cross_tokenizer=True))
    assert report["mean"]["kl"] > 1e-3                  # 100 x the bound above (the tiny teacher is nearly flat)


def test_cross_tokenizer_training_through_the_cli(toy_cache, tokenizers, tmp_path):
    from click.testing import CliRunner

    from pipeline.cli import cli

    bpe = tokenizers["bpe600"]
    build_llama(tmp_path / "student", len(bpe), hidden=32, layers=1, seed=3, eos_id=bpe.eos_token_id)
    bpe.save_pretrained(tmp_path / "student")
    args = ["train", "--cache", str(toy_cache), "--student", str(tmp_path / "student"), "--steps", "4",
            "--batch-size", "4", "--eval-rows", "4"]
    r = CliRunner().invoke(cli, [*args, "--out", str(tmp_path / "no")])
    assert r.exit_code != 0 and "--cross-tokenizer" in r.output and len(r.output.strip().splitlines()) == 1
    r = CliRunner().invoke(cli, [*args, "--out", str(tmp_path / "run"), "--cross-tokenizer", "--sampling", "ddk",
                                 "--adakd", "--kd-weight", "1", "--ce-weight", "0.5", "--ddk-interval", "2"])
    assert r.exit_code == 0, r.output
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 4 and all(0 < s < 1 for rec in records for s in rec["aligned_share"].values())
    assert all(np.isfinite(rec["loss"]) and rec["kd_loss"] > 0 for rec in records)
    report = json.loads((tmp_path / "run" / "eval.json").read_text())
    for d in report["domains"].values():
        assert 0 < d["aligned_share"] < 1 and d["trained_ce"] > 0 and 0 < d["ce_per_byte"] < d["trained_ce"]
    r = CliRunner().invoke(cli, ["eval", "--cache", str(toy_cache), "--student", str(tmp_path / "run" / "final"),
                                 "--cross-tokenizer"])
    assert r.exit_code == 0 and "aligned" in r.output


# ---------------------------------------------------------------------------------------------- refusals

def test_refusals(toy_cache, tokenizers, tmp_path):
    from trainer.config import TrainConfig
    from trainer.evaluate import EvalConfig

    old = tmp_path / "old"
    shutil.copytree(toy_cache, old)
    manifest = json.loads((old / "manifest.json").read_text())
    del manifest["tokenizer"]["token_bytes"]                             # as an older kdcache wrote it
    (old / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(KdcacheError, match="recapture"):
        StudentRows.for_cache(open_cache(old), tokenizers["bpe600"], 1 << 30)

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    wp = Tokenizer(models.WordPiece({"[UNK]": 0, "the": 1}, unk_token="[UNK]"))
    wp.pre_tokenizer = pre_tokenizers.Whitespace()
    lossy = PreTrainedTokenizerFast(tokenizer_object=wp, unk_token="[UNK]", eos_token="[UNK]")
    with pytest.raises(KdcacheError, match="byte for byte"):
        StudentRows.for_cache(open_cache(toy_cache), lossy, 1 << 30, "wp-student")

    assert TrainConfig(cache="c", student="s", out="o", cross_tokenizer=True).ce_weight == 1.0   # measured default
    assert TrainConfig(cache="c", student="s", out="o", cross_tokenizer=True, ce_weight=0.0).ce_weight == 0.0
    with pytest.raises(KdcacheError, match="--ddk-profile"):
        TrainConfig(cache="c", student="s", out="o", sampling="ddk", ddk_profile="p.json", cross_tokenizer=True)
    with pytest.raises(KdcacheError, match="--unaligned"):
        TrainConfig(cache="c", student="s", out="o", cross_tokenizer=True, unaligned="uld")
    with pytest.raises(KdcacheError, match="--generate with --cross-tokenizer"):
        EvalConfig(cache="c", student="s", generate=2, cross_tokenizer=True)
