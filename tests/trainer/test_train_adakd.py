"""kdcache train --adakd: LATF and IDTS through the loop, their ablations, exact resume and bad options."""

import json
import math
import shutil
from pathlib import Path

import pytest

from cache_format import KdcacheError
from trainer.adakd import LATF, AdaKDConfig
from trainer.config import TrainConfig
from trainer.train import run_train

from tests.helpers import kdcache


def adakd_config(toy_cache, student, out, **kw) -> TrainConfig:
    base = dict(cache=str(toy_cache), student=str(student), out=str(out), steps=16, batch_size=4, lr=3e-3,
                adakd=True, adakd_warmup_fraction=0.25, adakd_beta=0.5, eval_rows=0, prefetch=1)
    return TrainConfig(**{**base, **kw})


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_adakd_focus_follows_latf_and_temperatures_stay_in_range(toy_cache, tiny_models, tmp_path):
    cfg = adakd_config(toy_cache, tiny_models["student"], tmp_path / "run", temperature=1.5, adakd_c=0.4)
    run_train(cfg)
    recs = metrics(tmp_path / "run")
    latf = LATF.from_config(cfg.adakd_config, cfg.steps)                      # replay Eq. 6-7 on the logged losses
    for r in recs:
        assert r["focus_ratio"] == pytest.approx(latf.ratio, rel=1e-6)          # logged as float32
        latf_ratio = latf.ratio
        latf.update(r["kd_loss"], r["step"])
        assert r["latf_ema"] == latf.ema
        tokens = r["tokens"] - 4                                               # the last position of each row
        assert r["selected_tokens"] == max(1, math.floor(tokens * latf_ratio))
        assert 1.5 * math.exp(-0.4) - 1e-6 <= r["tau_min"] <= r["tau_mean"] <= r["tau_max"] <= 1.5 * math.exp(0.4) + 1e-6
        assert r["tau_min"] < r["tau_max"]
    assert any(r["focus_ratio"] < 1 for r in recs[4:]), [r["focus_ratio"] for r in recs]
    assert (tmp_path / "run" / "adakd.png").stat().st_size > 1000


def test_ablations_latf_off_keeps_every_token_idts_off_keeps_the_temperature(toy_cache, tiny_models, tmp_path):
    run_train(adakd_config(toy_cache, tiny_models["student"], tmp_path / "no-latf", steps=4, latf=False))
    assert all(r["focus_ratio"] == 1 and r["selected_tokens"] == r["tokens"] - 4
               for r in metrics(tmp_path / "no-latf"))
    run_train(adakd_config(toy_cache, tiny_models["student"], tmp_path / "no-idts", steps=4, idts=False,
                           temperature=1.3))
    assert all(r["tau_min"] == r["tau_max"] == pytest.approx(1.3) for r in metrics(tmp_path / "no-idts"))


def test_ddk_plus_adakd_resumes_exactly(toy_cache, tiny_models, tmp_path):
    kw = dict(sampling="ddk", ddk_interval=4, ddk_val_rows=4, save_every=8, adakd_eps=0.0)  # eps 0: r moves
    run_train(adakd_config(toy_cache, tiny_models["student"], tmp_path / "ref", **kw))
    run = tmp_path / "run"
    run_train(adakd_config(toy_cache, tiny_models["student"], run, **kw))
    shutil.rmtree(run / "checkpoints" / "step-00000016")
    shutil.rmtree(run / "final")
    run_train(adakd_config(toy_cache, tiny_models["student"], run, resume=True, **kw))
    strip = lambda rs: [{k: v for k, v in r.items() if k not in ("tokens_per_s", "elapsed_s")} for r in rs]  # noqa: E731
    assert strip(metrics(run)) == strip(metrics(tmp_path / "ref"))
    assert any(r["focus_ratio"] < 1 for r in metrics(run))


def test_no_tau_squared_reaches_the_loss_through_the_cli(toy_cache, tiny_models, tmp_path):
    """Same init, same first batch: the step-1 KD loss changes with --no-tau-squared under IDTS, not at tau = 1."""
    def first_kd_loss(name, *flags):
        out = tmp_path / name
        r = kdcache("train", "--cache", toy_cache, "--student", tiny_models["student"], "--out", out, "--steps", 1,
                    "--batch-size", 4, "--eval-rows", 0, "--adakd", "--no-latf", *flags)
        assert r.returncode == 0, r.stderr
        return metrics(out)[0]["kd_loss"]

    assert first_kd_loss("tau2") != first_kd_loss("weight1", "--no-tau-squared")
    assert first_kd_loss("tau1", "--no-idts") == first_kd_loss("tau1-weight1", "--no-idts", "--no-tau-squared")


@pytest.mark.parametrize("option, value, message", [
    ("adakd_beta", 1.0, r"--adakd-beta 1.0 is invalid.*\(0, 1\)"), ("adakd_delta", 0.0, "--adakd-delta"),
    ("adakd_min_ratio", 1.5, "--adakd-min-ratio"), ("adakd_c", -1.0, "--adakd-c"),
    ("adakd_warmup_fraction", 1.0, "--adakd-warmup-fraction"), ("loss", "ce", "--adakd needs a distillation")])
def test_bad_adakd_options_are_refused_at_start(option, value, message):
    with pytest.raises(KdcacheError, match=message):
        TrainConfig(cache="c", student="s", out="o", adakd=True, **{option: value})
    TrainConfig(cache="c", student="s", out="o", **{option: value} if option != "loss" else {})  # off: not checked


def test_adakd_defaults_are_the_papers():
    cfg = TrainConfig(cache="c", student="s", out="o", adakd=True).adakd_config
    assert cfg == AdaKDConfig(tau_base=1.0, c=0.5, beta=0.99, eps=0.05, delta=0.05, min_ratio=0.1,
                              warmup_fraction=0.05)
