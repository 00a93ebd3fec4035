"""kdcache demo end to end on the shipped reference assets, at a few steps (the full demo is `make demo`).

The HF engine captures here: the vLLM engine is exercised by tests/pipeline/test_capture_vllm.py, and a second
engine in the same test session would double its start-up time and memory.
"""

import json
import math
import re

import pytest
from click.testing import CliRunner

from cache_format import open_cache
from pipeline.cli import cli
from pipeline.demo import ASSETS, CHAT, DOMAINS, METHODS, _slug

ARGS = ["--backend", "hf", "--steps", "6", "--warmup-steps", "3", "--max-tokens-per-domain", "3000"]


@pytest.fixture(scope="module")
def demo_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "out"
    result = CliRunner().invoke(cli, ["demo", "--out", str(out), *ARGS])
    assert result.exit_code == 0, result.output
    return out


def test_shipped_assets_are_small_and_complete():
    files = [p for p in ASSETS.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 25 * 2**20
    for model in ("teacher", "student"):
        for name in ("config.json", "model.safetensors", "tokenizer.json"):
            assert (ASSETS / model / name).is_file(), f"{model}/{name}"
    for d in DOMAINS:
        lines = (ASSETS / "corpus" / f"{d}.jsonl").read_text().splitlines()
        assert len(lines) >= 1000
        for line in lines[:50]:
            record = json.loads(line)
            if d == CHAT:
                roles = [m["role"] for m in record["messages"]]
                assert roles[-1] == "assistant" and set(roles) <= {"system", "user", "assistant"}
            else:
                assert record["text"]
    assert (ASSETS / "README.md").is_file()


def test_shipped_tokenizer_has_a_chat_template_with_generation_marks():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ASSETS / "teacher")
    assert "{% generation %}" in tok.chat_template
    messages = json.loads((ASSETS / "corpus" / f"{CHAT}.jsonl").read_text().splitlines()[0])["messages"]
    out = tok.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    trained = [t for t, m in zip(out["input_ids"], out["assistant_masks"]) if m]
    # exactly the replies, each with its end-of-turn token
    assert tok.decode(trained) == "".join(m["content"] + "<|end|>" for m in messages if m["role"] == "assistant")


def test_report_has_every_method_on_every_domain(demo_out):
    report = (demo_out / "report.md").read_text()
    for name in ("teacher", "student before (warm-up)", *METHODS):
        row = re.search(rf"^\| {re.escape(name)} \|(.*)\|$", report, re.M)
        assert row, f"no row for {name}"
        values = [float(v.strip(" *")) for v in row[1].split("|")]
        assert len(values) == len(DOMAINS) + 1 and all(math.isfinite(v) and v > 1 for v in values), row[0]
    assert "bytes/token" in report and "| step |" in report
    assert f"{CHAT} (replies)" in report
    rouge = json.loads((demo_out / "generate.json").read_text())
    assert list(rouge) == ["student before (warm-up)", *METHODS, "teacher"]
    for name, r in rouge.items():
        row = re.search(rf"^\| {re.escape(name)} \| ([0-9.]+) \|$", report, re.M)
        assert row, f"no ROUGE-L row for {name}"
        assert 0 <= float(row[1]) <= 1 and abs(float(row[1]) - r["rouge_l"]) < 1e-3
        assert r["n"] >= 1 and r["examples"][0]["reference"]
    # the shipped teacher answers the val questions (the ceiling); the 3-step warm-up student does not
    assert rouge["teacher"]["rouge_l"] > 0.8 > rouge["student before (warm-up)"]["rouge_l"]
    for png in ("val_ppl.png", "domain_weights.png", "domain_loss.png", "adakd.png"):
        assert (demo_out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png


def test_methods_ran_under_equal_budgets_and_eval_the_whole_val_split(demo_out):
    cache = open_cache(demo_out / "cache")
    student = str(demo_out / "runs" / "student-warmup" / "final")
    for name, options in METHODS.items():
        run = demo_out / "runs" / _slug(name)
        config = json.loads((run / "config.json").read_text())["config"]
        assert config["student"] == student and config["steps"] == 6 and config["seed"] == 0
        assert {k: config[k] for k in options} == options
        assert len((run / "metrics.jsonl").read_text().splitlines()) == 6
        report = json.loads((run / "eval.json").read_text())
        # every supervised val position (text: all but each document's last; chat: the replies only)
        val = cache.manifest.splits["val"]
        assert {d: report["domains"][d]["tokens"] for d in DOMAINS} == {d: val[d].supervised_tokens for d in DOMAINS}
        assert val[CHAT].supervised_tokens < 0.6 * val[CHAT].tokens


def test_rerun_keeps_finished_stages(demo_out):
    before = {p: p.stat().st_mtime_ns for p in demo_out.glob("runs/*/metrics.jsonl")}
    result = CliRunner().invoke(cli, ["demo", "--out", str(demo_out), *ARGS])
    assert result.exit_code == 0, result.output
    assert {p: p.stat().st_mtime_ns for p in demo_out.glob("runs/*/metrics.jsonl")} == before


def test_bad_option_is_one_line_error(tmp_path):
    result = CliRunner().invoke(cli, ["demo", "--out", str(tmp_path / "o"), "--steps", "0"])
    assert result.exit_code == 1
    assert result.output.strip() == "Error: --steps 0: must be >= 1"
    assert not (tmp_path / "o").exists()
