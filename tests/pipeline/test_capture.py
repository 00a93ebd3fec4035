"""kdcache capture end to end with the HF engine: content, resume after kill -9, bad input (workers + merge:
test_merge.py)."""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from cache_format import TOKENIZER_NAME, KdcacheError, TopkV2, TopkV3, open_cache, publish, verify_cache
from pipeline.config import CaptureConfig
from pipeline.corpus import DataSpec
from tests.helpers import kdcache
from tests.toy import domain_texts


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("corpus")
    paths = {}
    for domain in ("code", "prose", "math"):
        paths[domain] = root / f"{domain}.jsonl"
        with open(paths[domain], "w") as f:
            for text in domain_texts(domain, 60, seed=5):
                f.write(json.dumps({"text": text}) + "\n")
    return paths


def capture_args(tiny_models, corpus, out, *extra, codec: str | None = "v1"):
    """The engine and resume tests compare full-precision top-k (codec v1); codec=None: the default (v3)."""
    data = [a for d, p in corpus.items() for a in ("--data", f"{d}={p}")]
    return ["capture", "--teacher", tiny_models["teacher"], *data, "--out", out, "--backend", "hf",
            "--top-k", 8, "--seq-len", 64, "--val-fraction", 0.1, "--batch-size", 4, "--shard-size-mb", 0.02,
            *(("--codec", codec) if codec else ()), *extra]


@pytest.fixture(scope="module")
def hf_cache(tiny_models, corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("hf") / "cache"
    r = kdcache(*capture_args(tiny_models, corpus, out))
    assert r.returncode == 0, r.stderr
    return out


@pytest.mark.parametrize("codec", ["v2", None])
def test_quantised_codecs_match_the_exact_cache_within_their_bounds(hf_cache, tiny_models, corpus, tmp_path, codec):
    """topk-v2 and the default (topk-v3) against the v1 capture of the same teacher: same rows; v2 keeps a prefix of
    the exact top-k, v3 lists it (in id order after the top-1); log-probs within the quantiser's bound (v3: the
    valued ones; the shared ones keep their total mass); with the default, 2 workers + merge give the same cache."""
    out = tmp_path / "q"
    r = kdcache(*capture_args(tiny_models, corpus, out, codec=codec))
    assert r.returncode == 0, r.stderr
    verify_cache(out)
    q, v1 = open_cache(out), open_cache(hf_cache)
    name = "topk-v2" if codec == "v2" else "topk-v3"
    assert q.manifest.codec["name"] == name and q.manifest.codec["kl_scale"] == (0.015 if codec else 0.013)
    assert q.manifest.codec["vocab_size"] >= q.manifest.tokenizer.vocab_size
    assert sum(s.bytes for s in q.manifest.shards()) < sum(s.bytes for s in v1.manifest.shards()) / 2
    for a, b in zip(q.iter_rows("train"), v1.iter_rows("train")):
        np.testing.assert_array_equal(a["input_ids"], b["input_ids"])
        kept = np.isfinite(a["topk_logprobs"])
        assert kept[:-1, 0].all() and not kept[-1].any()
        np.testing.assert_array_equal(a["topk_ids"][:-1, 0], b["topk_ids"][:-1, 0])          # the top-1 first
        assert np.abs(a["topk_logprobs"][:-1, 0] - b["topk_logprobs"][:-1, 0]).max() <= 0.2
        n = kept.sum(1)
        if codec == "v2":
            np.testing.assert_array_equal(np.where(kept, a["topk_ids"], 0), np.where(kept, b["topk_ids"], 0))
            assert np.abs(np.where(kept, a["topk_logprobs"], 0) - np.where(kept, b["topk_logprobs"], 0)).max() <= 0.2
        else:
            for t in range(len(n) - 1):
                assert set(a["topk_ids"][t, :n[t]]) == set(b["topk_ids"][t, :n[t]])
            mass = lambda lp, m: np.where(m, np.exp(lp.astype(np.float64)), 0).sum(1)  # noqa: E731
            first_n = np.arange(kept.shape[1]) < n[:, None]
            assert np.abs(mass(a["topk_logprobs"], kept) - mass(b["topk_logprobs"], first_n))[:-1].max() <= 0.05
        assert np.abs(a["target_logprobs"][:-1] - b["target_logprobs"][:-1]).max() <= 0.2
    if codec is not None:
        return                                                  # workers + merge: the default codec is enough
    for i in range(2):
        r = kdcache(*capture_args(tiny_models, corpus, tmp_path / f"p{i}", "--num-workers", 2, "--worker-index", i,
                                  codec=codec))
        assert r.returncode == 0, r.stderr
    r = kdcache("merge", tmp_path / "p0", tmp_path / "p1", "--out", tmp_path / "merged")
    assert r.returncode == 0, r.stderr
    assert shard_digests(tmp_path / "merged") == shard_digests(out)


def test_codec_choice_and_refusals():
    """No --codec: topk-v3 with its default rule, or topk-v2 where only v2 stores what is asked (sampled targets,
    --top-p); what a codec cannot store is one clear error."""
    cfg = lambda **kw: CaptureConfig(teacher="t", data=(DataSpec("code", "x"),), out="o", **kw)  # noqa: E731
    assert cfg().make_codec(1000) == TopkV3(top_k=64, vocab_size=1000, kl_scale=0.013)
    assert cfg(kl_budget=1e-3).make_codec(1000) == TopkV3(top_k=64, vocab_size=1000, kl_budget=1e-3)
    assert cfg(top_p=0.9).make_codec(1000) == TopkV2(top_k=64, vocab_size=1000, top_p=0.9, samples=50)
    assert cfg(codec="v2").make_codec(1000) == TopkV2(top_k=64, vocab_size=1000, kl_scale=0.015, samples=50)
    assert cfg(targets="sampled", backend="hf").codec_name == "v2"
    for kw, message in (({"codec": "v3", "top_p": 0.9}, "--targets sampled and --top-p need --codec v2"),
                        ({"codec": "v3", "targets": "sampled", "backend": "hf"}, "need --codec v2"),
                        ({"codec": "v1", "kl_scale": 0.1}, "--kl-budget and --kl-scale need --codec v2 or v3"),
                        ({"codec": "v4"}, "--codec must be v1, v2 or v3")):
        with pytest.raises(KdcacheError, match=message):
            cfg(**kw)


def test_sampled_targets_capture(tiny_models, corpus, tmp_path):
    """--targets sampled: K = --samples draws per position, log(count / N) summing to 1, the exact target logprob
    (float16), and the same draws on every run (seeded per row)."""
    args = capture_args(tiny_models, corpus, tmp_path / "s", "--targets", "sampled", "--samples", 6, codec=None)
    r = kdcache(*args)
    assert r.returncode == 0, r.stderr
    cache = open_cache(tmp_path / "s")
    assert cache.manifest.top_k == 6 and cache.manifest.codec["targets"] == "sampled"
    row = next(cache.iter_rows("train", "prose"))
    counts = np.exp(row["topk_logprobs"][:-1].astype(np.float64)) * 6
    np.testing.assert_allclose(counts, np.round(counts), atol=1e-4)
    np.testing.assert_allclose(counts.sum(1), 6, atol=1e-4)
    model = AutoModelForCausalLM.from_pretrained(tiny_models["teacher"]).eval()
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor(row["input_ids"][None], dtype=torch.long)).logits[0], -1)
    nxt = torch.tensor(row["input_ids"][1:], dtype=torch.long)
    np.testing.assert_allclose(row["target_logprobs"][:-1], logp[:-1].gather(-1, nxt[:, None])[:, 0].numpy(),
                               rtol=2e-3, atol=1e-4)
    r = kdcache(*args[:args.index("--out") + 1], tmp_path / "s2", *args[args.index("--out") + 2:])
    assert r.returncode == 0, r.stderr
    assert shard_digests(tmp_path / "s2") == shard_digests(tmp_path / "s")
    r = kdcache(*[a if a != "hf" else "vllm" for a in args])
    assert r.returncode == 1 and "--targets sampled needs" in r.stderr, r.stderr


def test_cache_content_matches_a_direct_teacher_forward(hf_cache, tiny_models, corpus):
    report = verify_cache(hf_cache)
    cache = open_cache(hf_cache)
    m = cache.manifest
    assert m.top_k == 8 and m.seq_len == 64 and m.teacher.engine == "hf" and m.teacher.logprobs_mode == "raw_logprobs"
    assert cache.domains("train") == ["code", "math", "prose"] and cache.domains("val") == ["code", "math", "prose"]
    assert len(m.splits["train"]["code"].shards) > 1                       # small shards: rotation happened
    tok = AutoTokenizer.from_pretrained(tiny_models["teacher"])
    assert m.tokenizer.vocab_size == len(tok) and m.tokenizer.eos_id == tok.eos_token_id
    # every document of the domain lands in exactly one split, EOS-joined, in order
    rows = {s: [r["input_ids"] for r in cache.iter_rows(s, "code")] for s in ("train", "val")}
    docs = [tok(t, add_special_tokens=False).input_ids + [tok.eos_token_id] for t in domain_texts("code", 60, seed=5)]
    assert sum(len(r) for s in rows for r in rows[s]) == sum(map(len, docs))
    assert all(len(r) == 64 for r in rows["train"][:-1])
    # the stored top-k equals a direct forward of the teacher on that row
    model = AutoModelForCausalLM.from_pretrained(tiny_models["teacher"]).eval()
    row = next(cache.iter_rows("train", "prose"))
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor(row["input_ids"][None], dtype=torch.long)).logits[0], -1)
    values, ids = logp[:-1].topk(8, -1)
    np.testing.assert_array_equal(row["topk_ids"][:-1], ids.numpy())
    np.testing.assert_allclose(row["topk_logprobs"][:-1], values.numpy(), atol=1e-5)
    nxt = torch.tensor(row["input_ids"][1:], dtype=torch.long)
    np.testing.assert_allclose(row["target_logprobs"][:-1], logp[:-1].gather(-1, nxt[:, None])[:, 0].numpy(), atol=1e-5)
    assert np.isneginf(row["topk_logprobs"][-1]).all() and np.isnan(row["target_logprobs"][-1])
    assert report.tokens == sum(d.tokens for ds in m.splits.values() for d in ds.values())


def test_rerun_is_a_noop_and_other_options_are_refused(hf_cache, tiny_models, corpus):
    before = (hf_cache / "manifest.json").read_bytes()
    r = kdcache(*capture_args(tiny_models, corpus, hf_cache))
    assert r.returncode == 0 and "already complete" in r.stderr
    assert (hf_cache / "manifest.json").read_bytes() == before
    r = kdcache(*capture_args(tiny_models, corpus, hf_cache)[:-2], "--shard-size-mb", 0.02, "--top-k", 4)
    assert r.returncode == 1 and "top_k: 8 -> 4" in r.stderr, r.stderr
    # the same inputs by other paths (relative, from another directory, a trailing slash): the same capture
    root = Path(os.path.commonpath([tiny_models["teacher"], *corpus.values()]))
    relative = {d: os.path.relpath(p, root) for d, p in corpus.items()}
    r = kdcache(*capture_args({"teacher": os.path.relpath(tiny_models["teacher"], root) + "/"}, relative, hf_cache),
                cwd=root)
    assert r.returncode == 0 and "already complete" in r.stderr, r.stderr


def shard_digests(cache_dir: Path) -> dict[str, str]:
    return {s.path: s.sha256 for s in open_cache(cache_dir).manifest.shards()}


@pytest.mark.slow
def test_resume_after_kill_equals_uninterrupted(hf_cache, tiny_models, corpus, tmp_path):
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", *map(str, capture_args(tiny_models, corpus, out))],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and len(list((out / ".progress").rglob("*.parquet.json"))) < 2:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "capture finished before it could be killed"
    assert not (out / "manifest.json").exists()
    r = kdcache(*capture_args(tiny_models, corpus, out))
    assert r.returncode == 0, r.stderr
    verify_cache(out)
    assert shard_digests(out) == shard_digests(hf_cache)
    assert json.loads((out / "manifest.json").read_text())["splits"] == \
        json.loads((hf_cache / "manifest.json").read_text())["splits"]


def one_line_error(r: subprocess.CompletedProcess) -> str:
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1, r.stderr
    assert lines and lines[-1].startswith("Error: ") and "Traceback" not in r.stderr, r.stderr
    return lines[-1]


def test_bad_inputs_one_line_error_and_no_manifest(tiny_models, corpus, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    no_field = tmp_path / "nofield.jsonl"
    no_field.write_text('{"body": "x"}\n')
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"text": "ok"}\n{"text": \n')
    a_file = tmp_path / "afile"
    a_file.write_text("x")
    teacher = tiny_models["teacher"]
    cases = {
        "missing path": (["--data", f"code={tmp_path / 'nope.jsonl'}"], "nope.jsonl"),
        "empty file": (["--data", f"code={empty}"], "empty.jsonl"),
        "no text field": (["--data", f"code={no_field}"], "text"),
        "malformed json": (["--data", f"code={bad_json}"], "bad.jsonl"),
        "no domain": (["--data", str(corpus["code"])], "DOMAIN=PATH"),
        "k zero": (["--data", f"code={corpus['code']}", "--top-k", 0], "--top-k"),
        "k above vocab": (["--data", f"code={corpus['code']}", "--top-k", 100000], "vocabulary"),
        "seq len": (["--data", f"code={corpus['code']}", "--seq-len", 1], "--seq-len"),
    }
    for name, (args, needle) in cases.items():
        out = tmp_path / name.replace(" ", "_")
        r = kdcache("capture", "--teacher", teacher, "--out", out, "--backend", "hf", "--seq-len", 64, *args)
        assert needle in one_line_error(r), (name, r.stderr)
        assert not (out / "manifest.json").exists(), name
    r = kdcache("capture", "--teacher", tmp_path / "no-model", "--data", f"code={corpus['code']}", "--out",
                tmp_path / "o", "--backend", "hf")
    assert "no-model" in one_line_error(r)
    r = kdcache("capture", "--teacher", teacher, "--data", f"code={corpus['code']}", "--out", a_file, "--backend", "hf")
    assert "not a directory" in one_line_error(r)


def test_the_cache_carries_the_teacher_tokenizer_and_verify_checks_it(hf_cache, tiny_models, tmp_path):
    """tokenizer.json at the cache root is the teacher's fast serialisation, its sha256 in the manifest; a copy to
    a URL carries it; verify refuses it corrupted or missing in one line naming it."""
    teacher = AutoTokenizer.from_pretrained(tiny_models["teacher"])
    data = (hf_cache / TOKENIZER_NAME).read_bytes()
    assert data.decode() == teacher.backend_tokenizer.to_str()
    info = open_cache(hf_cache).manifest.tokenizer
    assert info.file_sha256 == hashlib.sha256(data).hexdigest()
    assert info.named_ids == {"bos": teacher.bos_token_id, "eos": teacher.eos_token_id, "unk": None, "pad": None}
    url = f"file://{tmp_path / 'published'}"
    publish(str(hf_cache), url)                                     # capture --out URL and merge commit this way
    assert (tmp_path / "published" / TOKENIZER_NAME).read_bytes() == data
    verify_cache(url)

    bad = tmp_path / "bad"
    shutil.copytree(hf_cache, bad)
    (bad / TOKENIZER_NAME).write_bytes(data.replace(b'"', b"'", 1))
    assert f"Error: {bad / TOKENIZER_NAME}: sha256 mismatch" in one_line_error(kdcache("verify", bad))
    (bad / TOKENIZER_NAME).unlink()
    assert f"Error: {bad / TOKENIZER_NAME}: missing" in one_line_error(kdcache("verify", bad))


@pytest.mark.slow
def test_two_captures_into_one_out_the_second_is_refused(tiny_models, corpus, tmp_path):
    """The first holds CACHE.lock while it writes; the second, started meanwhile, is one Error line naming it;
    the first's cache is complete and sound."""
    out = tmp_path / "cache"
    first = subprocess.Popen([sys.executable, "-m", "pipeline", *map(str, capture_args(tiny_models, corpus, out))],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (tmp_path / "cache.lock").exists() and first.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    second = kdcache(*capture_args(tiny_models, corpus, out))
    _, err = first.communicate(timeout=600)
    assert first.returncode == 0, err[-2000:]
    assert second.returncode == 1, second.stderr[-2000:]
    line = second.stderr.strip().splitlines()[-1]
    assert line.startswith(f"Error: {out}: another run is writing it (kdcache capture, pid {first.pid} on "), line
    verify_cache(out)
    assert not (tmp_path / "cache.lock").exists()


@pytest.mark.slow
def test_sigterm_is_one_line_and_the_rerun_resumes(hf_cache, tiny_models, corpus, tmp_path):
    """SIGTERM mid-capture: exit 143, one line saying how to resume, no .tmp left; the re-run completes the cache
    (the same shards as an uninterrupted capture)."""
    out = tmp_path / "terminated"
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", *map(str, capture_args(tiny_models, corpus, out))],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and len(list((out / ".progress").rglob("*.parquet.json"))) < 2:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    assert err.strip().splitlines()[-1] == "Error: interrupted (SIGTERM); re-run the same command to resume"
    assert "Traceback" not in err and not list(out.rglob("*.tmp")) and not (out / "manifest.json").exists()
    r = kdcache(*capture_args(tiny_models, corpus, out))
    assert r.returncode == 0, r.stderr[-2000:]
    assert shard_digests(out) == shard_digests(hf_cache)
