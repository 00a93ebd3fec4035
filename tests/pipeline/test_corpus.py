"""Corpus ingestion (formats, resolution, bad inputs, invalid UTF-8), splits and packing."""

import gzip
import hashlib
import json
import logging
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from transformers import AutoTokenizer

from cache_format import KdcacheError
from pipeline.corpus import (CorpusStats, DataSpec, Reading, iter_split_rows, load_mixture, parse_data_spec,
                             resolve_files, split_of, tokenize_documents)
from pipeline.corpus.packing import _Packer, _with_eos
from pipeline.corpus.records import _file_documents
from tests.toy import build_tokenizer, domain_texts


def iter_documents(spec: DataSpec, text_field: str = "text", stats: CorpusStats | None = None, fmt: str = "auto"):
    """The documents capture reads from a spec's files, in `resolve_files` order."""
    stats = stats if stats is not None else CorpusStats()
    for path in resolve_files(spec):
        yield from _file_documents(path, text_field, stats, fmt)


def pack_documents(token_ids, seq_len: int, eos_id: int):
    """`concat` packing of token lists as capture packs text: an EOS after each document, int32 rows of seq_len."""
    packer = _Packer(seq_len)
    for ids in token_ids:
        tokens = _with_eos(ids, eos_id)
        yield from (row.input_ids for row in packer.add(tokens, np.ones(len(tokens), bool)))
    if (tail := packer.flush()) is not None:
        yield tail.input_ids


DOCS = domain_texts("prose", 40) + ["ünïcödé — “quotes” 数学 🙂", "  leading and trailing spaces  "]


def compress(data: bytes, suffix: str) -> bytes:
    if suffix.endswith(".gz"):
        return gzip.compress(data)
    if suffix.endswith(".zst"):
        return zstandard.ZstdCompressor().compress(data)
    return data


def write_corpus(path, docs: list[str], field: str = "text") -> str:
    """docs written in the format named by path's suffix (a directory path without suffix: save_to_disk)."""
    name = path.name
    if name.endswith(".parquet"):
        pq.write_table(pa.table({"id": list(range(len(docs))), field: docs}), path)
    elif "." not in name:
        from datasets import Dataset
        Dataset.from_dict({field: docs}).save_to_disk(str(path))
    elif ".txt" in name:
        path.write_bytes(compress("".join(d + "\n" for d in docs).encode(), name))
    elif ".jsonl" in name:
        lines = "".join(json.dumps({"id": i, field: d}) + "\n" for i, d in enumerate(docs))
        path.write_bytes(compress(lines.encode(), name))
    else:
        path.write_bytes(compress(json.dumps([{field: d, "id": i} for i, d in enumerate(docs)]).encode(), name))
    return str(path)


def docs_of(path, **kw) -> list[str]:
    return list(iter_documents(DataSpec("d", str(path)), **kw))


@pytest.fixture(scope="module")
def tokenizer(tiny_models):
    return AutoTokenizer.from_pretrained(tiny_models["tokenizer"])


# --- formats and resolution ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["c.jsonl", "c.jsonl.gz", "c.jsonl.zst", "c.json", "c.json.gz", "c.parquet",
                                  "c.txt", "c.txt.gz", "c.txt.zst", "saved"])
def test_every_format_yields_the_same_documents_as_plain_jsonl(tmp_path, name):
    reference = docs_of(write_corpus(tmp_path / "ref.jsonl", DOCS))
    assert reference == DOCS
    assert docs_of(write_corpus(tmp_path / name, DOCS)) == reference


def test_multi_frame_zstd_is_read_to_the_end(tmp_path):
    c = zstandard.ZstdCompressor()
    for plain in ("m.jsonl", "m.txt"):
        frames = b""
        for part in (DOCS[:10], DOCS[10:]):
            write_corpus(tmp_path / plain, part)
            frames += c.compress((tmp_path / plain).read_bytes())
        (tmp_path / (plain + ".zst")).write_bytes(frames)
        assert docs_of(tmp_path / (plain + ".zst")) == DOCS


def test_text_field_option(tmp_path):
    for name in ("c.jsonl", "c.parquet", "saved"):
        path = write_corpus(tmp_path / name, DOCS, field="content")
        assert docs_of(path, text_field="content") == DOCS
        with pytest.raises(KdcacheError, match="no field 'text'.*content"):
            docs_of(path)


def test_txt_one_document_per_non_empty_line(tmp_path):
    (tmp_path / "c.txt").write_bytes(b"first\r\n\n   \nsecond\rthird\n")
    stats = CorpusStats()
    assert list(iter_documents(DataSpec("d", str(tmp_path / "c.txt")), stats=stats)) == ["first", "second", "third"]
    assert stats.skipped_empty == 2 and stats.files == 1


def test_directory_is_searched_recursively_in_sorted_order(tmp_path):
    root = tmp_path / "corpus"
    (root / "b" / "deep").mkdir(parents=True)
    (root / ".git").mkdir()
    write_corpus(root / "b" / "deep" / "z.txt", ["bz"])
    write_corpus(root / "b" / "a.jsonl.gz", ["ba"])
    write_corpus(root / "c.parquet", ["c"])
    write_corpus(root / "a.jsonl", ["a"])
    write_corpus(root / "saved", ["s1", "s2"])
    write_corpus(root / ".git" / "x.jsonl", ["hidden"])
    write_corpus(root / ".hidden.jsonl", ["hidden"])
    (root / "README.md").write_text("not data")
    files = resolve_files(DataSpec("d", str(root)))
    assert files == [str(root / p) for p in ("a.jsonl", "b/a.jsonl.gz", "b/deep/z.txt", "c.parquet", "saved")]
    assert docs_of(root) == ["a", "ba", "bz", "c", "s1", "s2"]
    assert resolve_files(DataSpec("d", str(root))) == files


def test_glob_resolution(tmp_path):
    for name in ("b.jsonl", "a.jsonl", "c.txt", "sub/d.jsonl"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        write_corpus(tmp_path / name, [name])
    assert docs_of(tmp_path / "*.jsonl") == ["a.jsonl", "b.jsonl"]
    assert docs_of(tmp_path / "**" / "*.jsonl") == ["a.jsonl", "b.jsonl", "sub/d.jsonl"]
    assert docs_of(tmp_path / "s*") == ["sub/d.jsonl"]  # a matched directory is searched
    with pytest.raises(KdcacheError, match="no files match"):
        docs_of(tmp_path / "*.parquet")


def test_save_to_disk_dataset_dict_reads_its_splits(tmp_path):
    from datasets import Dataset, DatasetDict
    DatasetDict({"train": Dataset.from_dict({"text": ["t1", "t2"]}),
                 "test": Dataset.from_dict({"text": ["v1"]})}).save_to_disk(str(tmp_path / "dd"))
    assert resolve_files(DataSpec("d", str(tmp_path / "dd"))) == [str(tmp_path / "dd/test"),
                                                                     str(tmp_path / "dd/train")]
    assert docs_of(tmp_path / "dd") == ["v1", "t1", "t2"]


# --- specs and mixtures -------------------------------------------------------------------------------------------

def test_parse_data_spec():
    assert parse_data_spec("code=data/x=1.jsonl") == DataSpec("code", "data/x=1.jsonl")
    assert parse_data_spec("web.en-2_b=/abs/*.txt") == DataSpec("web.en-2_b", "/abs/*.txt")
    for bad in ("data/code.jsonl", "=data/code.jsonl", "a/b=x.jsonl", "..=x.jsonl", "co de=x", "code="):
        with pytest.raises(KdcacheError, match="--data"):
            parse_data_spec(bad)


def test_load_mixture(tmp_path):
    (tmp_path / "mix.yaml").write_text("data:\n  code: code/\n  prose: [p1.jsonl, /abs/p2.txt]\nseq_len: 64\n")
    assert load_mixture(str(tmp_path / "mix.yaml")) == [
        DataSpec("code", os.path.join(tmp_path, "code/")), DataSpec("prose", str(tmp_path / "p1.jsonl")),
        DataSpec("prose", "/abs/p2.txt")]
    (tmp_path / "list.yaml").write_text("data:\n  - {domain: math, path: m.jsonl}\n  - {domain: code, path: c}\n")
    specs = load_mixture(str(tmp_path / "list.yaml"))
    assert specs == [DataSpec("math", str(tmp_path / "m.jsonl")), DataSpec("code", str(tmp_path / "c"))]


@pytest.mark.parametrize("content,match", [
    (None, "cannot read"),
    ("data: {code: [a, b\n", "invalid YAML"),
    ("- code: a\n", "expected a mapping"),
    ("datas: {code: a}\n", "mapping with a `data:` key"),
    ("data: code.jsonl\n", "must map domain"),
    ("data: [{domain: code}]\n", "must map domain"),
    ("data: {}\n", "empty"),
    ("data: {code: 3}\n", "'code': path must be"),
    ("data: {code: []}\n", "'code': path must be"),
    ("data: {'a/b': x}\n", "invalid domain name 'a/b'"),
])
def test_load_mixture_errors(tmp_path, content, match):
    path = tmp_path / "mix.yaml"
    if content is not None:
        path.write_text(content)
    with pytest.raises(KdcacheError, match=match) as e:
        load_mixture(str(path))
    assert str(path) in str(e.value)


# --- bad inputs ---------------------------------------------------------------------------------------------------

BAD_FILES = {
    "empty.jsonl": (b"", "empty file"),
    "empty.txt": (b"", "empty file"),
    "empty.jsonl.gz": (gzip.compress(b""), "empty file"),
    "empty.parquet": (None, "empty file"),
    "nofield.jsonl": (b'{"body": "a"}\n{"body": "b"}\n', r"no field 'text' \(fields: body\)"),
    "somerows.jsonl": (b'{"text": "a"}\n{"body": "b"}\n', "record 2: no field 'text'"),
    "malformed.jsonl": (b'{"text": "a"}\n{"text": "b",,}\n{"text": "c"}\n', "malformed JSON at line 2"),
    "malformed.jsonl.zst": (zstandard.ZstdCompressor().compress(b'{"text": "a"}\n{"text": \n'),
                            "malformed JSON at line 2"),
    "malformed.json": (b'[{"text": "a"},\n {"text": }]', "malformed JSON at line 2, column"),
    "scalar.jsonl": (b'{"text": "a"}\n"b"\n', "line 2"),
    "number.jsonl": (b'{"text": 1}\n{"text": 2}\n', "record 1: field 'text' holds a non-string value 1"),
    "mixed.jsonl": (b'{"text": "a"}\n{"text": ["b"]}\n', "record 2: field 'text' holds a non-string value"),
    "badutf8.json": (b'[{"text": "a\xff"}]', "invalid UTF-8 at byte"),
    "notgzip.jsonl.gz": (b'{"text": "a"}\n', "cannot read"),
    "data.csv": (b"text\na\n", "unsupported file type"),
}


@pytest.mark.parametrize("name", list(BAD_FILES))
def test_bad_file_is_one_error_naming_the_file(tmp_path, name):
    content, match = BAD_FILES[name]
    path = tmp_path / name
    if content is None:
        pq.write_table(pa.table({"text": pa.array([], pa.string())}), path)
    else:
        path.write_bytes(content)
    with pytest.raises(KdcacheError, match=match) as e:
        docs_of(path)
    assert str(e.value).count("\n") == 0 and str(path) in str(e.value)


def test_bad_data_paths(tmp_path):
    with pytest.raises(KdcacheError, match="does not exist") as e:
        resolve_files(DataSpec("code", str(tmp_path / "missing.jsonl")))
    assert str(tmp_path / "missing.jsonl") in str(e.value) and "code" in str(e.value)
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("x")
    with pytest.raises(KdcacheError, match="no supported data files") as e:
        resolve_files(DataSpec("code", str(tmp_path / "docs")))
    assert str(tmp_path / "docs") in str(e.value)


def test_domain_without_documents(tmp_path, tokenizer):
    (tmp_path / "blank.txt").write_text("\n   \n\t\n")
    spec = DataSpec("math", str(tmp_path / "blank.txt"))
    with pytest.raises(KdcacheError, match=r"domain 'math': no documents in .*blank\.txt \(3 empty skipped\)"):
        list(iter_split_rows(spec, tokenizer, 16, 0, 0.1))


@pytest.mark.parametrize("name", ["u.jsonl", "u.txt", "u.jsonl.gz", "u.txt.zst"])
def test_invalid_utf8_is_replaced_and_counted_once_per_file(tmp_path, name, caplog):
    lines = [b"ok \xff\xfe ok", b"fine", b"cut \xe2\x82", b"\xc3("]   # 2 + 0 + 1 + 1 invalid sequences
    if ".jsonl" in name:
        raw = b"".join(b'{"text": "' + line + b'"}\n' for line in lines)
    else:
        raw = b"".join(line + b"\n" for line in lines)
    path = tmp_path / name
    path.write_bytes(compress(raw, name))
    stats = CorpusStats()
    with caplog.at_level(logging.WARNING, logger="kdcache"):
        docs = list(iter_documents(DataSpec("d", str(path)), stats=stats))
    assert docs == ["ok \ufffd\ufffd ok", "fine", "cut \ufffd", "\ufffd("]
    assert stats.invalid_utf8 == 4
    messages = [r.getMessage() for r in caplog.records if r.name == "kdcache"]
    assert messages == [f"{path}: 4 invalid UTF-8 sequences replaced"]


# --- splits, tokenization, packing --------------------------------------------------------------------------------

def test_split_of_is_the_documented_hash():
    # fractions computed once with int(sha256(f"{seed}:{text}").hexdigest()[:16], 16) / 2**64
    for text, seed, fraction in [("hello world", 0, 0.2975670468105976), ("hello world", 1, 0.8153796880957543),
                                 ("def f(x): return x", 1234, 0.2698643774928526)]:
        h = int(hashlib.sha256(f"{seed}:{text}".encode()).hexdigest()[:16], 16)
        assert h / 2**64 == fraction
        assert split_of(text, seed, fraction + 1e-9) == "val"
        assert split_of(text, seed, fraction - 1e-9) == "train"
    assert split_of("hello world", 0, 0.0) == "train" and split_of("hello world", 0, 1.0) == "val"


def test_split_of_is_roughly_val_fraction():
    texts = [f"document number {i}" for i in range(5000)]
    for fraction in (0.02, 0.1, 0.5):
        share = sum(split_of(t, 7, fraction) == "val" for t in texts) / len(texts)
        assert abs(share - fraction) < 0.02 + fraction * 0.1
    assert [split_of(t, 1, 0.5) for t in texts[:50]] != [split_of(t, 2, 0.5) for t in texts[:50]]


def test_tokenize_documents_in_order(tokenizer):
    texts = domain_texts("code", 10)
    expected = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    assert list(tokenize_documents(iter(texts), tokenizer, batch_size=3)) == expected


def test_pack_documents():
    rng = np.random.default_rng(0)
    docs = [rng.integers(1, 100, size=n).tolist() for n in (5, 0, 17, 3, 30, 1)]
    rows = list(pack_documents(iter(docs), seq_len=8, eos_id=0))
    flat = np.concatenate(rows)
    expected = [t for d in docs for t in d + [0]]
    assert flat.tolist() == expected
    assert all(r.dtype == np.int32 and len(r) == 8 for r in rows[:-1])
    assert len(rows[-1]) == len(expected) % 8 and len(rows) == len(expected) // 8 + 1
    assert np.flatnonzero(flat == 0).tolist() == (np.cumsum([len(d) + 1 for d in docs]) - 1).tolist()
    exact = list(pack_documents([[1, 2, 3], [4, 5, 6, 7]], seq_len=3, eos_id=9))
    assert [r.tolist() for r in exact] == [[1, 2, 3], [9, 4, 5], [6, 7, 9]]
    assert list(pack_documents([], seq_len=4, eos_id=0)) == []
    with pytest.raises(KdcacheError, match="seq_len"):
        list(pack_documents([[1]], seq_len=0, eos_id=0))


def split_rows(spec, tokenizer, **kw):
    stats = CorpusStats()
    args = {"seq_len": 32, "seed": 3, "val_fraction": 0.3, "text_field": "text", "max_tokens": None} | kw
    rows = [(s, i, r.input_ids.tolist()) for s, i, r in iter_split_rows(spec, tokenizer, stats=stats, **args)]
    return rows, stats


def by_split(rows) -> dict[str, list[int]]:
    return {s: [t for split, _, r in rows if split == s for t in r] for s in ("train", "val")}


def test_split_rows_follow_split_of_and_pack_each_split(tmp_path, tokenizer):
    docs = domain_texts("math", 60) + ["   "]
    spec = DataSpec("math", write_corpus(tmp_path / "m.jsonl", docs))
    rows, stats = split_rows(spec, tokenizer)
    eos = tokenizer.eos_token_id
    for split in ("train", "val"):
        mine = [d for d in docs[:-1] if split_of(d, 3, 0.3) == split]
        expected = [t for d in mine for t in tokenizer(d, add_special_tokens=False)["input_ids"] + [eos]]
        assert by_split(rows)[split] == expected
        indices = [i for s, i, _ in rows if s == split]
        assert indices == list(range(len(indices))) == list(range(stats.rows[split]))
        lengths = [len(r) for s, _, r in rows if s == split]
        assert all(n == 32 for n in lengths[:-1]) and 0 < lengths[-1] <= 32
        assert stats.documents[split] == len(mine) and stats.tokens[split] == len(expected)
    assert stats.skipped_empty == 1 and not stats.capped and 0 < stats.documents["val"] < stats.documents["train"]
    partial = [k for k, (_, _, r) in enumerate(rows) if len(r) < 32]
    assert partial == [len(rows) - 2, len(rows) - 1] and [rows[-2][0], rows[-1][0]] == ["train", "val"]


def test_max_tokens_cap_is_exact_and_stops_reading(tmp_path, tokenizer):
    (tmp_path / "d").mkdir()
    spec = DataSpec("prose", str(tmp_path / "d"))
    write_corpus(tmp_path / "d" / "a.jsonl", domain_texts("prose", 100))
    full, _ = split_rows(spec, tokenizer)
    total = sum(len(r) for _, _, r in full)
    (tmp_path / "d" / "b.jsonl").write_text("not json\n")    # after the cap: must never be read
    for cap in (1, 31, 32, 33, 500, total - 1):
        rows, stats = split_rows(spec, tokenizer, max_tokens=cap)
        assert sum(len(r) for _, _, r in rows) == cap == sum(stats.tokens.values()) and stats.capped
        for split in ("train", "val"):
            assert by_split(rows)[split] == by_split(full)[split][:len(by_split(rows)[split])]
    with pytest.raises(KdcacheError, match="b.jsonl: malformed JSON at line 1"):
        split_rows(spec, tokenizer, max_tokens=total + 1)


def test_several_specs_of_one_domain_and_determinism(tmp_path, tokenizer):
    specs = [DataSpec("code", write_corpus(tmp_path / "a.txt.gz", domain_texts("code", 30))),
             DataSpec("code", write_corpus(tmp_path / "b.parquet", domain_texts("code", 30, seed=1)))]
    both, stats = split_rows(specs, tokenizer, seq_len=16)
    assert split_rows(specs, tokenizer, seq_len=16)[0] == both and stats.files == 2
    a, b = (by_split(split_rows([s], tokenizer, seq_len=16)[0]) for s in specs)
    assert by_split(both) == {split: a[split] + b[split] for split in ("train", "val")}
    capped = split_rows(specs, tokenizer, seq_len=16, max_tokens=999)[0]
    assert capped == split_rows(specs, tokenizer, seq_len=16, max_tokens=999)[0]
    with pytest.raises(ValueError, match="exactly one domain"):
        split_rows([specs[0], DataSpec("prose", specs[1].path)], tokenizer)


def test_isolated_packing_keeps_documents_whole_and_apart(tmp_path, tokenizer):
    """Text with --packing isolated: rows hold whole documents (a longer one in seq_len pieces), doc_lengths add up,
    and no position is supervised across a document boundary; the tokens are concat's in the same order."""
    docs = domain_texts("code", 30) + [" ".join(["x"] * 70)]
    spec = DataSpec("code", write_corpus(tmp_path / "c.jsonl", docs))
    eos = tokenizer.eos_token_id
    stats = CorpusStats()
    rows = list(iter_split_rows(spec, tokenizer, 32, 0, 0.0, stats=stats, reading=Reading(packing="isolated")))
    concat = [t for _, _, r in iter_split_rows(spec, tokenizer, 32, 0, 0.0) for t in r.input_ids.tolist()]
    assert [t for _, _, r in rows for t in r.input_ids.tolist()] == concat
    pieces = []
    for _, _, row in rows:
        assert sum(row.doc_lengths) == len(row) <= 32
        ends = np.cumsum(row.doc_lengths)
        expected = np.ones(len(row), bool)
        expected[ends - 1] = False                                  # a document's last token predicts nothing
        np.testing.assert_array_equal(row.supervised, expected)
        pieces += np.split(row.input_ids, ends[:-1])
    whole = [d for d in pieces if d[-1] == eos]
    assert len(whole) == len(docs) and all(len(p) <= 32 for p in pieces)
    assert sum(stats.supervised.values()) == len(concat) - len(pieces) and stats.truncated == 0


def test_conversations_are_truncated_never_split(tmp_path):
    from tests.pipeline.test_capture_chat import conversations
    from tests.pipeline.test_chat import CHATML_GEN

    tok = build_tokenizer(tmp_path / "tok")
    tok.add_tokens(["<|im_start|>", "<|im_end|>"], special_tokens=True)
    tok.chat_template = CHATML_GEN
    records = conversations(20, seed=0)
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    stats = CorpusStats()
    rows = list(iter_split_rows(DataSpec("chat", str(path)), tok, 40, 0, 0.0, stats=stats,
                                reading=Reading(packing="isolated")))
    assert stats.truncated > 0 and stats.documents["train"] + stats.no_response <= len(records)
    for _, _, row in rows:
        assert len(row) <= 40 and tok.decode(row.input_ids).startswith("<|im_start|>")
        assert all(tok.decode(d).startswith("<|im_start|>") for d in np.split(row.input_ids, np.cumsum(row.doc_lengths)[:-1]))


def test_a_bom_at_the_start_of_a_text_file_is_dropped_and_counted(tokenizer, tmp_path):
    (tmp_path / "a.txt").write_bytes(b"\xef\xbb\xbfthe story said\nof the\n")
    stats = CorpusStats()
    docs = list(iter_documents(DataSpec("prose", str(tmp_path / "a.txt")), stats=stats))
    assert docs == ["the story said", "of the"] and stats.boms == 1


def test_a_long_document_is_tokenized_only_as_far_as_the_cap(tokenizer, tmp_path, monkeypatch):
    """A one-line document of 2 M characters under --max-tokens-per-domain 500: the rows equal those of the whole
    document tokenized, and the tokenizer never sees more than a prefix of it."""
    import pipeline.corpus.packing as corpus
    text = " ".join(domain_texts("prose", 40_000, seed=9))
    assert len(text) > 2_000_000
    (tmp_path / "long.txt").write_text(text + "\n")
    seen = []
    encode = corpus._encode
    monkeypatch.setattr(corpus, "_encode", lambda tok, texts: seen.extend(map(len, texts)) or encode(tok, texts))
    rows = list(iter_split_rows(DataSpec("prose", str(tmp_path / "long.txt")), tokenizer, 64, 0, 0.0,
                                max_tokens=500))
    assert max(seen) < 100_000
    whole = tokenizer(text, add_special_tokens=False)["input_ids"][:500]
    assert np.concatenate([r.input_ids for _, _, r in rows]).tolist() == whole
