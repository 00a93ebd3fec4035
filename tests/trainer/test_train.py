"""kdcache train: the loop learns, resumes bitwise after kill -9, and refuses bad input with one clear line."""

import json
import math
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from cache_format import CacheError, KdcacheError, open_cache
from pipeline.cli import cli
from tests.toy import build_llama, build_tokenizer
from trainer.config import TrainConfig
from trainer.run_dir import latest_checkpoint
from trainer.train import lr_at, run_train

ROOT = Path(__file__).resolve().parents[2]


def config(toy_cache, student, out, **kw) -> TrainConfig:
    base = dict(cache=str(toy_cache), student=str(student), out=str(out), steps=30, batch_size=4, lr=3e-3,
                eval_rows=4, prefetch=1)
    return TrainConfig(**{**base, **kw})


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_lr_schedule_warmup_then_cosine_to_min():
    lrs = [lr_at(s, 1.0, warmup=10, steps=110, min_ratio=0.1) for s in range(110)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[10] == pytest.approx(1.0) and lrs[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))                      # cosine only decays
    assert lr_at(0, 2.0, warmup=0, steps=1, min_ratio=0.0) == pytest.approx(2.0)


def test_kd_loss_falls_and_run_dir_is_complete(toy_cache, tiny_models, tmp_path):
    run = tmp_path / "run"
    report = run_train(config(toy_cache, tiny_models["student"], run))
    recs = metrics(run)
    assert [r["step"] for r in recs] == list(range(1, 31))
    first, last = (sum(r["kd_loss"] for r in rs) / 5 for rs in (recs[:5], recs[-5:]))
    assert last < 0.7 * first, (first, last)
    for r in recs:
        assert {"step", "loss", "kd_loss", "ce_loss", "tokens_per_s", "lr", "domain_weights"} <= set(r)
        assert r["tokens_per_s"] > 0 and math.isclose(sum(r["domain_weights"].values()), 1.0)
    assert (run / "final" / "config.json").is_file() and (run / "final" / "tokenizer.json").is_file()
    assert (run / "loss.png").stat().st_size > 1000 and any((run / "tb").iterdir())
    saved = json.loads((run / "config.json").read_text())
    assert saved["config"]["loss"] == "fkl" and saved["resolved"]["warmup_steps"] == 1
    assert saved["cache_fingerprint"] == open_cache(toy_cache).fingerprint
    assert json.loads((run / "eval.json").read_text()) == report and set(report["domains"]) == {
        "code", "data", "math", "prose"}


def test_ce_baseline_runs_through_the_same_loop(toy_cache, tiny_models, tmp_path):
    run_train(config(toy_cache, tiny_models["student"], tmp_path / "run", loss="ce", steps=20, eval_rows=0))
    recs = metrics(tmp_path / "run")
    assert all(r["kd_loss"] == 0 and r["loss"] == r["ce_loss"] for r in recs)
    assert sum(r["ce_loss"] for r in recs[-5:]) < sum(r["ce_loss"] for r in recs[:5])
    assert not (tmp_path / "run" / "eval.json").exists()


def _train_cli(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pipeline", "train", *args], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_kill_9_then_resume_reproduces_the_uninterrupted_run(toy_cache, tiny_models, tmp_path):
    args = ["--cache", str(toy_cache), "--student", str(tiny_models["student"]), "--steps", "24",
            "--batch-size", "4", "--lr", "3e-3", "--grad-accum", "2", "--save-every", "6", "--eval-rows", "0"]
    ref = _train_cli([*args, "--out", str(tmp_path / "ref")])
    assert ref.wait(timeout=600) == 0, ref.stderr.read()

    run = tmp_path / "run"
    proc = _train_cli([*args, "--out", str(run)])
    deadline = time.time() + 600
    while latest_checkpoint(run) is None or latest_checkpoint(run).name < "step-00000012":
        assert proc.poll() is None, f"finished before the kill: {proc.stderr.read()}"
        assert time.time() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run / "final").exists()

    resumed = _train_cli([*args, "--out", str(run), "--resume"])
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read()
    drop = ("tokens_per_s", "elapsed_s")
    got = [{k: v for k, v in r.items() if k not in drop} for r in metrics(run)]
    want = [{k: v for k, v in r.items() if k not in drop} for r in metrics(tmp_path / "ref")]
    assert got == want                                                          # bitwise: floats compared exactly
    from safetensors.torch import load_file
    a, b = load_file(run / "final" / "model.safetensors"), load_file(tmp_path / "ref" / "final" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_what_it_cannot_continue(toy_cache, tiny_models, synthetic_cache, tmp_path):
    run = tmp_path / "run"
    with pytest.raises(KdcacheError, match="holds no training run"):
        run_train(config(toy_cache, tiny_models["student"], run, resume=True))
    run_train(config(toy_cache, tiny_models["student"], run, steps=4, eval_rows=0))
    with pytest.raises(KdcacheError, match="already holds a training run"):
        run_train(config(toy_cache, tiny_models["student"], run, steps=4))
    with pytest.raises(KdcacheError, match="no checkpoint"):
        run_train(config(toy_cache, tiny_models["student"], run, steps=4, resume=True))
    with pytest.raises(KdcacheError, match=r"another configuration: lr: 0.003 -> 0.001"):
        run_train(config(toy_cache, tiny_models["student"], run, steps=4, lr=1e-3, resume=True))
    other = tmp_path / "other-cache"
    shutil.copytree(toy_cache, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["split"]["seed"] = 99                                              # another cache, same shards
    (other / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(KdcacheError, match="the cache"):
        run_train(config(other, tiny_models["student"], run, steps=4, resume=True))


def test_padded_vocab_student_ignores_the_extra_logits(toy_cache, tiny_models, tmp_path):
    student = tmp_path / "padded"
    tok = build_tokenizer(student)
    build_llama(student, len(tok) + 64, hidden=32, layers=1, seed=2, eos_id=tok.eos_token_id)
    run_train(config(toy_cache, student, tmp_path / "run", steps=3, eval_rows=0, weight_decay=0.0))  # no decay:
    before = _lm_head(student)
    after = _lm_head(tmp_path / "run" / "final")
    V = len(tok)
    assert after.shape[0] == V + 64
    assert torch.equal(before[V:], after[V:]) and not torch.equal(before[:V], after[:V])   # padding: no gradient


def _lm_head(path: Path) -> torch.Tensor:
    from safetensors.torch import load_file
    return load_file(path / "model.safetensors")["lm_head.weight"]


def test_foreign_tokenizer_is_refused_before_any_output(toy_cache, tmp_path):
    student = tmp_path / "foreign"
    tok = build_tokenizer(student, vocab_size=300)
    build_llama(student, len(tok), hidden=32, layers=1, seed=2, eos_id=tok.eos_token_id)
    with pytest.raises(KdcacheError, match="tokenizer differs"):
        run_train(config(toy_cache, student, tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_nan_loss_stops_naming_step_and_domains(toy_cache, tiny_models, tmp_path):
    with pytest.raises(KdcacheError, match=r"non-finite loss at step \d+ .*domains (code|data|math|prose)"):
        run_train(config(toy_cache, tiny_models["student"], tmp_path / "run", lr=1e30, grad_clip=0, warmup_steps=0))
    assert not (tmp_path / "run" / "final").exists()


def test_corrupt_shard_is_named_and_never_trained_on(toy_cache, tiny_models, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(toy_cache, cache)
    shard = open_cache(cache).shards("train", "code")[0]
    data = bytearray((cache / shard.path).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (cache / shard.path).write_bytes(bytes(data))
    with pytest.raises(CacheError, match=f"{shard.path}: sha256 mismatch"):
        run_train(config(cache, tiny_models["student"], tmp_path / "run", sampling="uniform", steps=60))
    (cache / shard.path).write_bytes(bytes(data[:-10]))
    with pytest.raises(CacheError, match=f"{shard.path}: shard is"):
        run_train(config(cache, tiny_models["student"], tmp_path / "run2"))
    assert not (tmp_path / "run2").exists()


@pytest.mark.parametrize("option, value, message", [
    ("loss", "kl", "unknown loss"), ("steps", 0, "must be >= 1"), ("lr", -1.0, "positive"),
    ("jsd_beta", 1.5, r"\[0, 1\]"), ("warmup_steps", 99, "must be in"), ("temperature", 0.0, "> 0")])
def test_bad_options_are_refused(option, value, message, tmp_path):
    with pytest.raises(KdcacheError, match=f"--{option.replace('_', '-')} .*{message}"):
        TrainConfig(cache="c", student="s", out=str(tmp_path), **{"steps": 10, option: value})


def test_cli_train_one_line_errors_and_a_short_run(toy_cache, tiny_models, tmp_path):
    runner = CliRunner()
    base = ["train", "--cache", str(toy_cache), "--out", str(tmp_path / "run")]
    r = runner.invoke(cli, [*base, "--student", str(tmp_path / "missing")])
    assert r.exit_code == 1 and r.output.strip().count("\n") == 0 and "does not exist" in r.output
    r = runner.invoke(cli, [*base, "--student", str(tiny_models["student"]), "--loss", "nope"])
    assert r.exit_code == 2
    r = runner.invoke(cli, [*base, "--student", str(tiny_models["student"]), "--steps", "3", "--batch-size", "2",
                            "--loss", "jsd", "--jsd-beta", "0.3", "--ce-weight", "0.5", "--sampling", "uniform"])
    assert r.exit_code == 0, r.output
    saved = json.loads((tmp_path / "run" / "config.json").read_text())["config"]
    assert (saved["loss"], saved["jsd_beta"], saved["ce_weight"], saved["sampling"]) == ("jsd", 0.3, 0.5, "uniform")
    assert all(set(r["domain_weights"].values()) == {0.25} for r in metrics(tmp_path / "run"))


def test_resume_by_other_paths_to_the_same_inputs(toy_cache, tiny_models, tmp_path, monkeypatch):
    """The same cache and student named from another directory, relative, with a trailing slash, or copied
    elsewhere: the run resumes from its checkpoint (inputs compared by fingerprint)."""
    run = tmp_path / "run"
    run_train(config(toy_cache, tiny_models["student"], run, steps=4, save_every=2, eval_rows=0))
    shutil.rmtree(run / "checkpoints" / "step-00000004")
    copy = tmp_path / "elsewhere" / "student"
    shutil.copytree(tiny_models["student"], copy)
    monkeypatch.chdir(toy_cache.parent)
    run_train(config(f"./{toy_cache.name}/", str(copy) + "/", run, steps=4, save_every=2, eval_rows=0, resume=True))
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines][-2:] == [3, 4]


@pytest.mark.slow
def test_sigterm_is_one_line_and_resume_finishes(toy_cache, tiny_models, tmp_path):
    args = ["--cache", str(toy_cache), "--student", str(tiny_models["student"]), "--steps", "40",
            "--batch-size", "2", "--save-every", "2", "--eval-rows", "0", "--out", str(tmp_path / "run")]
    proc = _train_cli(args)
    deadline = time.time() + 600
    while latest_checkpoint(tmp_path / "run") is None:
        assert proc.poll() is None, f"finished before the signal: {proc.stderr.read()}"
        assert time.time() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    assert err.strip().splitlines()[-1] == \
        "Error: interrupted (SIGTERM); re-run the same command with --resume to continue"
    assert "Traceback" not in err and not list((tmp_path / "run").rglob("*.tmp"))
    resumed = _train_cli([*args, "--resume"])
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read()
