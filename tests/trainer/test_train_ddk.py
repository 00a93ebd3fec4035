"""kdcache train --sampling ddk: weights follow Eq. 1/2 through the loop, resume exactly, bad input refused."""

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from cache_format import KdcacheError
from tests.helpers import write_synthetic_cache
from trainer.config import TrainConfig
from trainer.profile import ProfileConfig, run_profile
from trainer.train import run_train


def ddk_config(toy_cache, student, out, **kw) -> TrainConfig:
    base = dict(cache=str(toy_cache), student=str(student), out=str(out), steps=12, batch_size=4, lr=3e-3,
                sampling="ddk", ddk_interval=4, ddk_val_rows=4, eval_rows=0, prefetch=1)
    return TrainConfig(**{**base, **kw})


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_ddk_weights_follow_eq1_then_eq2_every_interval(toy_cache, tiny_models, tmp_path):
    cfg = ddk_config(toy_cache, tiny_models["student"], tmp_path / "run")
    assert (cfg.kd_weight, cfg.ce_weight) == (0.2, 1.0)                          # DDK's Eq. 3 preset
    run_train(cfg)
    recs = metrics(tmp_path / "run")
    domains = sorted(recs[0]["domain_weights"])
    ratio0 = np.array([recs[0]["ddk_ratio"][d] for d in domains])
    w0 = np.exp(ratio0 - ratio0.max()) / np.exp(ratio0 - ratio0.max()).sum()    # Eq. 1
    np.testing.assert_allclose([recs[0]["domain_weights"][d] for d in domains], w0, rtol=1e-12)
    updates = [r["step"] for r in recs if "ddk_updates" in r and r["ddk_updates"] > 0]
    assert updates == [4, 8, 12]
    for r in recs:
        assert math.isclose(sum(r["domain_weights"].values()), 1.0, rel_tol=1e-12)
    for step in (4, 8):                                                           # Eq. 2 from the logged ratios
        before = np.array([recs[step - 1]["domain_weights"][d] for d in domains])
        ratio = np.array([recs[step - 1]["ddk_ratio"][d] for d in domains])
        x = np.log(before) + ratio
        want = 0.5 * np.exp(x - x.max()) / np.exp(x - x.max()).sum() + 0.5 / len(domains)
        np.testing.assert_allclose([recs[step]["domain_weights"][d] for d in domains], want, rtol=1e-12)
        assert recs[step]["domain_weights"] == recs[step + 2]["domain_weights"]  # constant within an interval
    assert (tmp_path / "run" / "domain_weights.png").stat().st_size > 1000


def test_ddk_interval_in_steps_or_as_a_fraction():
    cfg = lambda **kw: TrainConfig(cache="c", student="s", out="o", sampling="ddk", **kw)  # noqa: E731
    assert cfg(steps=300).ddk_every == 10                                          # ~30 updates by default
    assert cfg(steps=300, ddk_interval=0.1).ddk_every == 30
    assert cfg(steps=300, ddk_interval=7).ddk_every == 7


def test_ddk_resume_continues_exactly(toy_cache, tiny_models, tmp_path):
    run_train(ddk_config(toy_cache, tiny_models["student"], tmp_path / "ref", save_every=6))
    run = tmp_path / "run"
    run_train(ddk_config(toy_cache, tiny_models["student"], run, save_every=6))
    shutil.rmtree(run / "checkpoints" / "step-00000012")                         # as if killed after step 6's save
    shutil.rmtree(run / "final")
    run_train(ddk_config(toy_cache, tiny_models["student"], run, save_every=6, resume=True))
    strip = lambda rs: [{k: v for k, v in r.items() if k not in ("tokens_per_s", "elapsed_s")} for r in rs]  # noqa: E731
    assert strip(metrics(run)) == strip(metrics(tmp_path / "ref"))


def test_ddk_starts_from_a_profile_and_refuses_a_foreign_one(toy_cache, tiny_models, tmp_path):
    profile = run_profile(ProfileConfig(str(toy_cache), str(tiny_models["student"]), str(tmp_path / "profile.json"),
                                      max_rows_per_domain=4))
    run_train(ddk_config(toy_cache, tiny_models["student"], tmp_path / "run", steps=2,
                         ddk_profile=str(tmp_path / "profile.json")))
    assert metrics(tmp_path / "run")[0]["domain_weights"] == profile["weights"]
    with pytest.raises(KdcacheError, match="another student"):
        run_train(ddk_config(toy_cache, tiny_models["teacher"], tmp_path / "run2", steps=2,
                             ddk_profile=str(tmp_path / "profile.json")))


def test_ddk_needs_val_rows_per_domain(tiny_models, tmp_path):
    cache = tmp_path / "cache"
    write_synthetic_cache(cache, {"code": 4, "prose": 4})
    manifest = json.loads((cache / "manifest.json").read_text())
    del manifest["splits"]["val"]["prose"]
    (cache / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(KdcacheError, match="prose have no 'val' rows.*--val-fraction"):
        run_train(ddk_config(cache, tiny_models["student"], tmp_path / "run"))


@pytest.mark.parametrize("option, value, message", [
    ("ddk_alpha", 1.5, r"\[0, 1\]"), ("ddk_interval", 0, "steps >= 1"), ("ddk_interval", 2.5, "steps >= 1"),
    ("ddk_val_rows", 0, ">= 1")])
def test_bad_ddk_options_are_refused(option, value, message):
    with pytest.raises(KdcacheError, match=f"--{option.replace('_', '-')} .*{message}"):
        TrainConfig(cache="c", student="s", out="o", sampling="ddk", **{option: value})
    with pytest.raises(KdcacheError, match="needs --sampling ddk"):
        TrainConfig(cache="c", student="s", out="o", ddk_profile="p.json")
