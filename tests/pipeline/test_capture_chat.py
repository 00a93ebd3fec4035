"""Conversations end to end (HF engine): the supervised mask is the assistant spans, isolated documents get the
teacher's targets they get alone, a chat cache's bytes follow its supervised tokens, the student trains on the
responses, and every bad input is one `Error:` line naming file and record with nothing written."""

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from cache_format import open_cache, verify_cache
from tests.toy import build_llama, build_tokenizer, domain_texts
from tests.helpers import kdcache
from tests.pipeline.test_chat import CHATML, CHATML_GEN, REWRITES
from trainer.data import collate
from trainer.evaluate import evaluate

SYSTEM = {"role": "system", "content": "the story"}


def conversations(n: int, seed: int) -> list[dict]:
    """n chat records: arithmetic questions, every third with a system turn, every fourth with two exchanges."""
    rng = np.random.default_rng(seed)
    records = []
    for i in range(n):
        a, b, c = (int(x) for x in rng.integers(0, 50, 3))
        turns = [{"role": "user", "content": f"sum of {a} + {b}"}, {"role": "assistant", "content": f"{a} + {b} = {a + b}"}]
        if i % 4 == 0:
            turns += [{"role": "user", "content": f"and {c} ?"}, {"role": "assistant", "content": f"{a + b} + {c} = {a + b + c}"}]
        records.append({"messages": ([SYSTEM] if i % 3 == 0 else []) + turns})
    return records


def write_jsonl(path: Path, records: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


@pytest.fixture(scope="module")
def chat_models(tmp_path_factory) -> dict[str, Path]:
    """Tiny teacher (2 layers, d 64) and student (1 layer, d 32) whose tokenizer has ChatML turn tokens and the
    `{% generation %}` ChatML template."""
    root = tmp_path_factory.mktemp("chat_models")
    tok = build_tokenizer(root / "teacher")
    tok.add_tokens(["<|im_start|>", "<|im_end|>"], special_tokens=True)
    tok.chat_template = CHATML_GEN
    paths = {"teacher": root / "teacher", "student": root / "student"}
    build_llama(paths["teacher"], len(tok), hidden=64, layers=2, seed=1, eos_id=tok.eos_token_id)
    build_llama(paths["student"], len(tok), hidden=32, layers=1, seed=2, eos_id=tok.eos_token_id)
    for p in paths.values():
        tok.save_pretrained(p)
    return paths


@pytest.fixture(scope="module")
def chat_corpus(tmp_path_factory) -> dict[str, str]:
    """Domain `chat`: chat records, one without an assistant turn (skipped), and a file of conversational
    prompt-completion records; domain `pairs`: plain prompt-completion strings."""
    root = tmp_path_factory.mktemp("chat_corpus")
    (root / "chat").mkdir()
    chats = conversations(40, seed=0) + [{"messages": [SYSTEM, {"role": "user", "content": "hi"}]}]
    write_jsonl(root / "chat" / "a.jsonl", chats)
    pc = [{"prompt": r["messages"][:-1], "completion": r["messages"][-1:]} for r in conversations(12, seed=1)]
    write_jsonl(root / "chat" / "b.jsonl", pc)
    write_jsonl(root / "pairs.jsonl", [{"prompt": f"x = {i} ;", "completion": f" return x + {i}"} for i in range(30)])
    return {"chat": str(root / "chat"), "pairs": str(root / "pairs.jsonl")}


def chat_capture(models, corpus, out, *extra) -> list:
    data = [a for d, p in corpus.items() for a in ("--data", f"{d}={p}")]
    return ["capture", "--teacher", models["teacher"], *data, "--out", out, "--backend", "hf", "--top-k", 8,
            "--seq-len", 96, "--val-fraction", 0.2, "--batch-size", 4, "--shard-size-mb", 0.02, *extra]


@pytest.fixture(scope="module")
def chat_cache(chat_models, chat_corpus, tmp_path_factory) -> Path:
    """The exact (codec v1) chat cache, rendered with the tokenizer's own `{% generation %}` template."""
    out = tmp_path_factory.mktemp("chat_cache") / "cache"
    r = kdcache(*chat_capture(chat_models, chat_corpus, out, "--codec", "v1"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "domain chat: 1 conversations without an assistant turn to train on skipped" in r.stderr
    return out


def documents(row: dict) -> list[slice]:
    starts = np.flatnonzero(row["position_ids"] == 0).tolist() + [len(row["input_ids"])]
    return [slice(a, b) for a, b in zip(starts[:-1], starts[1:])]


def trained_runs(tok, row: dict) -> list[str]:
    """The decoded runs of trained tokens (token t+1 of every supervised position t)."""
    ids, sup = row["input_ids"], row["supervised"]
    runs, cur = [], []
    for t in range(len(ids) - 1):
        if sup[t]:
            cur.append(int(ids[t + 1]))
        elif cur:
            runs, cur = runs + [tok.decode(cur)], []
    return runs + ([tok.decode(cur)] if cur else [])


def test_supervised_positions_are_the_assistant_replies(chat_cache, chat_models, chat_corpus):
    verify_cache(chat_cache)
    cache, tok = open_cache(chat_cache), AutoTokenizer.from_pretrained(chat_models["teacher"])
    m = cache.manifest
    assert m.packing == "isolated" and m.capture_config["chat_template_fingerprint"]
    replies, expected = [], 0
    for path in sorted(Path(chat_corpus["chat"]).glob("*.jsonl")):
        for line in path.read_text().splitlines():
            r = json.loads(line)
            msgs = r["messages"] if "messages" in r else r["completion"]     # a prompt's replies are context
            expected += sum(m["role"] == "assistant" for m in msgs)
            replies += [m["content"] + "<|im_end|>" for m in msgs if m["role"] == "assistant"]
    runs, supervised = [], 0
    for split in ("train", "val"):
        for row in cache.iter_rows(split, "chat"):
            for doc in documents(row):
                text = tok.decode(row["input_ids"][doc])
                assert text.startswith("<|im_start|>") and text.endswith("<|im_end|>\n")   # whole conversations
            runs += trained_runs(tok, row)
            supervised += int(row["supervised"].sum())
            # the teacher's distribution exists exactly at the supervised positions
            np.testing.assert_array_equal(np.isfinite(row["target_logprobs"]), row["supervised"])
        assert m.splits[split]["chat"].supervised_tokens == sum(
            int(r["supervised"].sum()) for r in cache.iter_rows(split, "chat"))
    assert sorted(runs) == sorted(replies) and len(runs) == expected
    # plain prompt-completion pairs: the completion and the EOS are trained, the prompt is not
    pairs = [run for split in ("train", "val") for row in cache.iter_rows(split, "pairs") for run in trained_runs(tok, row)]
    assert sorted(pairs) == sorted(f" return x + {i}<|eos|>" for i in range(30))


def test_a_template_without_generation_marks_gives_the_same_cache(chat_cache, chat_models, chat_corpus, tmp_path):
    """--chat-template FILE without {% generation %}: the mask located in the render equals the marked one."""
    (tmp_path / "chatml.jinja").write_text(CHATML)
    r = kdcache(*chat_capture(chat_models, chat_corpus, tmp_path / "cache", "--codec", "v1",
                              "--chat-template", tmp_path / "chatml.jinja"))
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = open_cache(chat_cache), open_cache(tmp_path / "cache")
    assert a.manifest.capture_config["chat_template_fingerprint"] != b.manifest.capture_config["chat_template_fingerprint"]
    for split in ("train", "val"):
        for ra, rb in zip(a.iter_rows(split), b.iter_rows(split), strict=True):
            for key in ("input_ids", "supervised", "position_ids", "topk_ids"):
                np.testing.assert_array_equal(ra[key], rb[key])


def test_isolated_documents_get_the_targets_they_get_alone(chat_cache, chat_models):
    """HF engine: each document of a packed row has the teacher's top-k of that document run alone (the whole row
    run as one causal sequence differs: the test would see cross-document attention)."""
    cache = open_cache(chat_cache)
    model = AutoModelForCausalLM.from_pretrained(chat_models["teacher"], dtype=torch.float32).eval()
    max_err, leak, multi = 0.0, 0.0, 0
    for row in cache.iter_rows("train"):
        docs = documents(row)
        multi += len(docs) > 1
        with torch.no_grad():
            whole = torch.log_softmax(model(torch.tensor(row["input_ids"]).long()[None]).logits[0], -1)
        for doc in docs:
            with torch.no_grad():
                alone = torch.log_softmax(model(torch.tensor(row["input_ids"][doc]).long()[None]).logits[0], -1)
            sup = row["supervised"][doc]                                           # (n,)
            ids = torch.from_numpy(row["topk_ids"][doc][sup]).long()               # (n', K)
            cached = torch.from_numpy(row["topk_logprobs"][doc][sup])
            max_err = max(max_err, (alone[torch.from_numpy(sup)].gather(-1, ids) - cached).abs().max().item())
            if doc.start > 0:
                leak = max(leak, (whole[doc][torch.from_numpy(sup)].gather(-1, ids) - cached).abs().max().item())
    assert multi > 0
    assert max_err <= 1e-4, max_err
    assert leak > 1e-2, leak


def test_student_forward_on_an_isolated_batch_equals_each_document_alone(chat_cache, chat_models):
    """The batches' position_ids (padding as a document of its own) keep documents apart in the student too."""
    cache = open_cache(chat_cache)
    model = AutoModelForCausalLM.from_pretrained(chat_models["student"], dtype=torch.float32).eval()
    rows = list(cache.iter_rows("train", "pairs"))[:4]
    batch = collate(rows, cache.manifest.tokenizer.eos_id)
    assert (~batch["attention_mask"].bool()).any() and sum(len(documents(r)) for r in rows) > len(rows)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        for b, row in enumerate(rows):
            for doc in documents(row):
                alone = model(torch.tensor(row["input_ids"][doc]).long()[None]).logits[0]
                torch.testing.assert_close(logits[b, doc], alone, atol=1e-5, rtol=1e-5)


def payload_bytes(cache_dir: Path) -> int:
    """Compressed bytes of a cache's shards less the token ids themselves (input_ids) and the Parquet footers."""
    total = 0
    for f in Path(cache_dir).rglob("*.parquet"):
        md = pq.ParquetFile(f).metadata
        total += sum(md.row_group(g).column(c).total_compressed_size for g in range(md.num_row_groups)
                     for c in range(md.num_columns) if md.row_group(g).column(c).path_in_schema != "input_ids")
    return total


def test_chat_cache_bytes_follow_the_supervised_tokens(chat_models, tmp_path):
    """The same replies after prompts twice as long: the tokens double, the teacher's data (all but the token ids)
    grows by a fraction of that: a chat cache pays for its responses, not its prompts."""
    chats = [{"messages": [m for m in r["messages"] if m["role"] != "system"]} for r in conversations(150, seed=4)]
    longer = [{"messages": [{"role": "system", "content": text}, *r["messages"]]}
              for r, text in zip(chats, domain_texts("prose", len(chats), seed=9))]
    sizes = {}
    for name, records in (("short", chats), ("long", longer)):
        path = write_jsonl(tmp_path / f"{name}.jsonl", records)
        r = kdcache(*chat_capture(chat_models, {"chat": path}, tmp_path / name, "--seq-len", 160,
                                  "--shard-size-mb", 1))
        assert r.returncode == 0, r.stderr[-3000:]
        total = open_cache(tmp_path / name).manifest.summary()["total"]
        sizes[name] = (payload_bytes(tmp_path / name), total["supervised_tokens"], total["tokens"])
    (p_short, s_short, n_short), (p_long, s_long, n_long) = sizes["short"], sizes["long"]
    assert s_long == s_short and n_long > 1.8 * n_short, sizes
    assert p_long / p_short - 1 < 0.3 * (n_long / n_short - 1), sizes


def test_training_on_a_chat_cache_lowers_response_ce(chat_cache, chat_models, tmp_path):
    from trainer.config import TrainConfig
    from trainer.train import run_train

    cache = open_cache(chat_cache)
    before = AutoModelForCausalLM.from_pretrained(chat_models["student"], dtype=torch.float32)
    ce_before = evaluate(cache, before, "val")["domains"]["chat"]["student_ce"]
    report = run_train(TrainConfig(cache=str(chat_cache), student=str(chat_models["student"]), out=str(tmp_path / "run"),
                                   steps=30, batch_size=4, lr=1e-2, warmup_steps=0, eval_rows=100, loss="ce",
                                   sampling="natural"))
    assert report["domains"]["chat"]["tokens"] == cache.manifest.splits["val"]["chat"].supervised_tokens
    assert report["domains"]["chat"]["student_ce"] < ce_before - 0.5, (ce_before, report["domains"]["chat"])


# --- bad input ----------------------------------------------------------------------------------------------------

GOOD = {"messages": [{"role": "user", "content": "sum of 1 + 2"}, {"role": "assistant", "content": "1 + 2 = 3"}]}
BAD_RECORDS = {
    "messages not a list": ({"messages": "hello"}, "record 2: messages must be a non-empty list"),
    "no role": ({"messages": [{"content": "x"}]}, "record 2: messages[0] has no 'role'"),
    "no content": ({"messages": [{"role": "user"}]}, "record 2: messages[0] has no 'content'"),
    "unknown role": ({"messages": [{"role": "bot", "content": "x"}]}, "record 2: messages[0].role 'bot' is not one of"),
    "content not a string": ({"messages": [{"role": "user", "content": 5}]},
                             "record 2: messages[0].content must be a string, got int 5"),
}


@pytest.mark.parametrize("case", list(BAD_RECORDS))
def test_bad_record_is_one_error_naming_file_and_record(chat_models, tmp_path, case):
    record, message = BAD_RECORDS[case]
    path = write_jsonl(tmp_path / "chat.jsonl", [GOOD, record, GOOD])
    assert_refused(kdcache(*chat_capture(chat_models, {"chat": path}, tmp_path / "cache")), tmp_path / "cache",
                   f"{path}: {message}")


@pytest.mark.parametrize("case", ["raises", "rewrites replies", "no template", "no assistant turn", "text lines"])
def test_bad_template_or_domain_is_refused(chat_models, tiny_models, tmp_path, case):
    path = write_jsonl(tmp_path / "chat.jsonl", [GOOD, GOOD])
    models, extra = chat_models, []
    if case == "raises":
        (tmp_path / "t.jinja").write_text("{{ messages[0].content | no_such_filter }}")
        extra, message = ["--chat-template", tmp_path / "t.jinja"], f"{path}: record 1: the chat template failed"
    elif case == "rewrites replies":
        (tmp_path / "t.jinja").write_text(REWRITES)
        extra, message = ["--chat-template", tmp_path / "t.jinja"], (f"{path}: record 1: messages[1] (assistant) is "
                                                                     "not in the chat template's render")
    elif case == "no template":
        models, message = tiny_models, f"{path}: record 1: the tokenizer {tiny_models['teacher']} has no chat template"
    elif case == "no assistant turn":
        write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}] * 3)
        message = "domain 'chat': no documents in"
    else:
        (tmp_path / "chat.txt").write_text("a line\n")
        path = str(tmp_path / "chat.txt")
        extra, message = ["--format", "chat"], f"{path}: --format chat needs records"
    r = kdcache(*chat_capture(models, {"chat": path}, tmp_path / "cache", *extra))
    line = assert_refused(r, tmp_path / "cache", message)
    if case == "no assistant turn":
        assert "3 without an assistant turn to train on skipped" in line


def assert_refused(r, out: Path, message: str) -> str:
    """Exit 1, the last stderr line is the one `Error:` line holding `message`, and no cache directory is left."""
    assert r.returncode == 1, r.stderr[-2000:]
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith("Error: ") and message in line, line
    assert sum(s.startswith("Error") for s in r.stderr.splitlines()) == 1 and "Traceback" not in r.stderr
    assert not out.exists()
    return line
