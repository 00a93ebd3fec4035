"""kdcache profile: DDK's per-domain gap and initial weights on a real (tiny) cache; load_profile's refusals."""

import dataclasses
import json
import logging
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from cache_format import KdcacheError, open_cache, read_manifest, write_manifest
from pipeline.capture import run_capture
from pipeline.config import CaptureConfig
from pipeline.cli import cli
from pipeline.corpus import parse_data_spec
from tests.toy import domain_texts
from trainer.ddk import initial_weights
from trainer.evaluate import evaluate
from trainer.profile import ProfileConfig, format_profile_table, load_profile, run_profile
from trainer.student import load_student

DOMAINS = ["code", "prose"]
DOMAIN_FIELDS = {"tokens", "student_ce", "teacher_ce", "student_ppl", "teacher_ppl", "ratio", "kl", "weight"}


@pytest.fixture(scope="module")
def cache(tiny_models, tmp_path_factory) -> Path:
    """A real HF capture of the tiny teacher: 2 domains, train and val rows in each."""
    root = tmp_path_factory.mktemp("profile")
    specs = []
    for domain in DOMAINS:
        path = root / f"{domain}.jsonl"
        path.write_text("".join(json.dumps({"text": t}) + "\n" for t in domain_texts(domain, 40, seed=3)))
        specs.append(parse_data_spec(f"{domain}={path}"))
    out = run_capture(CaptureConfig(teacher=str(tiny_models["teacher"]), data=tuple(specs), out=str(root / "cache"),
                                    backend="hf", top_k=8, seq_len=32, val_fraction=0.3, batch_size=8))
    c = open_cache(out)
    assert c.domains("train") == DOMAINS and c.domains("val") == DOMAINS
    return out


@pytest.fixture(scope="module")
def profiled(cache, tiny_models, tmp_path_factory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("profiled") / "profile.json"
    return run_profile(ProfileConfig(str(cache), str(tiny_models["student"]), str(out), batch_size=4, device="cpu")), out


def copy_with_manifest(src: Path, dst: Path, **changes) -> Path:
    """A copy of a cache whose manifest has `changes` (dataclasses.replace) applied."""
    shutil.copytree(src, dst)
    write_manifest(dst, dataclasses.replace(read_manifest(dst), **changes))
    return dst


def test_run_profile_measures_the_gap_and_writes_the_weights(profiled, cache, tiny_models):
    result, out = profiled
    assert json.loads(out.read_text()) == result
    assert not out.with_name(out.name + ".tmp").exists()
    assert result["kind"] == "kdcache-profile" and result["version"] == 1 and result["split"] == "val"
    c = open_cache(cache)
    assert result["cache"] == {"path": str(cache), "fingerprint": c.fingerprint}
    assert result["student"]["path"] == str(tiny_models["student"]) and len(result["student"]["fingerprint"]) == 64
    assert result["max_rows_per_domain"] is None
    assert result["config"] == {"cache": str(cache), "student": str(tiny_models["student"]), "out": str(out),
                                "split": "val", "batch_size": 4, "max_rows_per_domain": None, "device": "cpu"}
    assert list(result["domains"]) == DOMAINS and list(result["weights"]) == DOMAINS
    assert sum(result["weights"].values()) == pytest.approx(1.0, abs=1e-12)
    model, _ = load_student(str(tiny_models["student"]), c.manifest, device="cpu")
    report = evaluate(c, model, batch_size=4)
    for d, stats in result["domains"].items():
        assert set(stats) == DOMAIN_FIELDS
        ref = report["domains"][d]
        assert stats["teacher_ce"] == ref["teacher_ce"] and stats["student_ce"] == ref["student_ce"]
        assert stats["tokens"] == ref["tokens"] and stats["kl"] == ref["kl"]
        assert stats["ratio"] == pytest.approx(math.exp(ref["student_ce"] - ref["teacher_ce"]))
        assert stats["student_ppl"] == pytest.approx(math.exp(ref["student_ce"]))
        assert stats["teacher_ppl"] == pytest.approx(math.exp(ref["teacher_ce"]))
        assert stats["weight"] == result["weights"][d]
    expected = initial_weights([report["domains"][d]["student_ce"] for d in DOMAINS],
                               [report["domains"][d]["teacher_ce"] for d in DOMAINS])
    np.testing.assert_allclose(list(result["weights"].values()), expected, rtol=1e-12)
    table = format_profile_table(result)
    assert table.splitlines()[0].split() == ["domain", "tokens", "student_ppl", "teacher_ppl", "ratio", "kl",
                                             "ddk_weight"]
    assert [line.split()[0] for line in table.splitlines()[1:]] == DOMAINS


def test_validation_budget_limits_rows(cache, tiny_models, tmp_path):
    result = run_profile(ProfileConfig(str(cache), str(tiny_models["student"]), str(tmp_path / "p.json"),
                                       max_rows_per_domain=1, device="cpu"))
    assert result["max_rows_per_domain"] == 1
    assert all(d["tokens"] == 31 for d in result["domains"].values())       # one row of 32 tokens
    with pytest.raises(KdcacheError, match="--max-rows-per-domain 0: must be >= 1"):
        ProfileConfig(str(cache), str(tiny_models["student"]), str(tmp_path / "q.json"), max_rows_per_domain=0)


def test_cli_prints_the_table_and_logs_the_file(cache, tiny_models, tmp_path, caplog):
    out = tmp_path / "sub" / "profile.json"
    with caplog.at_level(logging.INFO, logger="kdcache"):
        r = CliRunner().invoke(cli, ["profile", "--cache", str(cache), "--student", str(tiny_models["student"]),
                                     "--out", str(out), "--batch-size", "4", "--max-rows-per-domain", "2"])
    assert r.exit_code == 0, r.output
    assert "ddk_weight" in r.stdout and all(d in r.stdout for d in DOMAINS)
    assert json.loads(out.read_text())["max_rows_per_domain"] == 2
    assert f"profile written to {out}" in caplog.text


def test_load_profile_returns_the_weights_and_refuses_other_inputs(profiled, cache, tiny_models, tmp_path):
    result, path = profiled
    c, student = open_cache(cache), tiny_models["student"]
    assert load_profile(path, c, student) == result["weights"]

    other = open_cache(copy_with_manifest(cache, tmp_path / "other", seq_len=31))
    with pytest.raises(KdcacheError, match=rf"{path}: measured on another cache .*re-run kdcache profile"):
        load_profile(path, other, student)
    with pytest.raises(KdcacheError, match=rf"{path}: measured with another student"):
        load_profile(path, c, tiny_models["teacher"])

    def refused(text: str, match: str) -> None:
        bad = tmp_path / "bad.json"
        bad.write_text(text)
        with pytest.raises(KdcacheError, match=match) as e:
            load_profile(bad, c, student)
        assert str(e.value).startswith(f"{bad}: ") and "\n" not in str(e.value)

    refused("{not json", "malformed JSON")
    refused(json.dumps({"kind": "something-else"}), "not a kdcache profile")
    refused(json.dumps([1, 2]), "not a kdcache profile")
    refused(json.dumps({**result, "version": 7}), "unsupported profile version 7")
    refused(json.dumps({k: v for k, v in result.items() if k != "weights"}), "missing field 'weights'")
    refused(json.dumps({**result, "weights": {"code": 1.0}}),
            r"profile domains \['code'\] differ from the cache's train domains \['code', 'prose'\]")
    refused(json.dumps({**result, "weights": {"code": 0.9, "prose": 0.9}}), "must be a distribution")
    with pytest.raises(KdcacheError, match="cannot read the profile"):
        load_profile(tmp_path / "missing.json", c, student)


def test_missing_val_rows_are_a_clear_error(cache, tiny_models, tmp_path):
    m = read_manifest(cache)
    no_val = copy_with_manifest(cache, tmp_path / "no_val", splits={"train": m.splits["train"]})
    r = CliRunner().invoke(cli, ["profile", "--cache", str(no_val), "--student", str(tiny_models["student"]),
                                 "--out", str(tmp_path / "p.json")])
    assert r.exit_code == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), r.stderr
    assert "split 'val' has no rows" in lines[0] and "--val-fraction > 0" in lines[0]
    assert not (tmp_path / "p.json").exists()

    one_val = copy_with_manifest(cache, tmp_path / "one_val",
                                 splits={"train": m.splits["train"], "val": {"code": m.splits["val"]["code"]}})
    with pytest.raises(KdcacheError, match=r"train domain\(s\) prose have no 'val' rows; DDK needs val data per "
                                           r"domain: capture with --val-fraction > 0"):
        run_profile(ProfileConfig(str(one_val), str(tiny_models["student"]), str(tmp_path / "p.json"), device="cpu"))
