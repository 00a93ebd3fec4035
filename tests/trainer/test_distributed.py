"""kdcache train under real torchrun (2 ranks, gloo on CPU): DDP and FSDP2 match one process, read every row once
per epoch, agree on DDK/AdaKD state, and resume exactly."""

import json
import os
import re
import shutil
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cache_format import KdcacheError, open_cache
from trainer.config import TrainConfig
from trainer.train import run_train

ROOT = Path(__file__).resolve().parents[2]
TORCHRUN = Path(sys.executable).with_name("torchrun")
OPTIONS = ["--lr", "3e-3", "--sampling", "ddk", "--adakd", "--eval-rows", "16", "--prefetch", "1"]
LONG = ["--steps", "200", "--save-every", "100"]          # long enough to end near a plateau: 2 % is meaningful
SHORT = ["--steps", "30", "--save-every", "15"]           # FSDP on gloo is slow
DROP = ("tokens_per_s", "elapsed_s")                      # timings: the only fields that may differ on a resume


def train(toy_cache, student, out: Path, *args: str, ranks: int = 2) -> str:
    """`torchrun --nproc_per_node 2 -m pipeline --debug train ...` with batch 8 over all ranks (or one plain
    process); its stderr. One thread per process, as torchrun sets."""
    train_args = ["train", "--cache", str(toy_cache), "--student", str(student), "--out", str(out),
                  "--batch-size", str(8 // ranks), *OPTIONS, *args]
    launcher = [str(TORCHRUN), "--standalone", "--nproc_per_node", str(ranks)] if ranks > 1 else [sys.executable]
    proc = subprocess.run([*launcher, "-m", "pipeline", "--debug", *train_args], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-6000:]
    return proc.stderr


def metrics(run: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in DROP}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


def val_ce(run: Path) -> float:
    return json.loads((run / "eval.json").read_text())["mean"]["student_ce"]


def rows_read(log: str) -> dict[tuple[int, str, int], list[int]]:
    """{(rank, domain, epoch): row indices in the order trained on} from the --debug log."""
    read = defaultdict(list)
    for rank, rows in re.findall(r"rank (\d+) step \d+ rows (\[.*\])", log):
        for domain, epoch, row in json.loads(rows):
            read[(int(rank), domain, epoch)].append(row)
    return read


def resume_from_middle(run: Path, toy_cache, student, *args: str) -> None:
    """Drop a finished run's last checkpoint and outputs, --resume it from the checkpoint before, and check that it
    ends exactly as it did: the same metrics (floats compared exactly) and the same final weights."""
    want, weights = metrics(run), load_file(run / "final" / "model.safetensors")
    last, middle = sorted((run / "checkpoints").iterdir())[::-1]
    for path in (last, run / "final", run / "eval.json"):
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    log = train(toy_cache, student, run, *args, "--resume")
    assert f"resuming {run} from step {int(middle.name[5:])}" in log
    assert metrics(run) == want
    got = load_file(run / "final" / "model.safetensors")                       # final/: a plain save_pretrained
    assert got.keys() == weights.keys() and all(torch.equal(got[k], weights[k]) for k in got)


@pytest.fixture(scope="module")
def ddp(toy_cache, tiny_models, tmp_path_factory) -> tuple[Path, str]:
    run = tmp_path_factory.mktemp("ddp") / "run"
    return run, train(toy_cache, tiny_models["student"], run, *LONG)


@pytest.fixture(scope="module")
def fsdp(toy_cache, tiny_models, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("fsdp") / "run"
    train(toy_cache, tiny_models["student"], run, *SHORT, "--fsdp")
    return run


@pytest.mark.slow
def test_ddp_matches_one_process_and_reads_each_row_once_per_epoch(ddp, toy_cache, tiny_models, tmp_path):
    run, log = ddp
    one = tmp_path / "one"
    train(toy_cache, tiny_models["student"], one, *LONG, ranks=1)
    assert abs(val_ce(run) - val_ce(one)) <= 0.02 * val_ce(one), (val_ce(run), val_ce(one))
    assert val_ce(run) < 0.6 * metrics(run)[0]["ce_loss"]                      # it learnt: far from the start
    recs = metrics(run)
    assert [r["step"] for r in recs] == list(range(1, 201))                    # rank 0 alone writes
    assert max(r.get("ddk_updates", 0) for r in recs) > 10 and "latf_ema" in recs[-1]
    assert json.loads((run / "config.json").read_text())["world_size"] == 2
    state = torch.load(run / "checkpoints" / "step-00000200" / "state.pt", weights_only=True)
    assert [s["rank"] for s in state["stream"]] == [0, 1] and len(state["rng"]) == 2

    cache = open_cache(toy_cache)
    read = rows_read(log)
    for domain in cache.domains("train"):
        assert all((rank, domain, 1) in read for rank in (0, 1)), f"{domain}: a rank did not finish epoch 0"
        epoch0 = [read[(rank, domain, 0)] for rank in (0, 1)]
        assert all(len(rows) == len(set(rows)) for rows in epoch0)               # once on each rank
        assert not set(epoch0[0]) & set(epoch0[1])                               # disjoint slices
        assert sorted(epoch0[0] + epoch0[1]) == list(range(cache.manifest.splits["train"][domain].rows))


@pytest.mark.slow
def test_ddp_resume_continues_exactly(ddp, toy_cache, tiny_models):
    resume_from_middle(ddp[0], toy_cache, tiny_models["student"], *LONG)


@pytest.mark.slow
def test_fsdp_computes_what_ddp_computes(fsdp, toy_cache, tiny_models, tmp_path):
    train(toy_cache, tiny_models["student"], tmp_path / "ddp", *SHORT)
    a, b = metrics(fsdp), metrics(tmp_path / "ddp")
    assert a[0]["loss"] == pytest.approx(b[0]["loss"], rel=1e-6)                # same start, same rows
    assert a[0]["grad_norm"] == pytest.approx(b[0]["grad_norm"], rel=1e-4)      # gradients averaged alike
    assert val_ce(fsdp) == pytest.approx(val_ce(tmp_path / "ddp"), rel=0.01)
    assert a[-1]["domain_weights"] == pytest.approx(b[-1]["domain_weights"], rel=0.05)


@pytest.mark.slow
def test_fsdp_resume_continues_exactly(fsdp, toy_cache, tiny_models):
    resume_from_middle(fsdp, toy_cache, tiny_models["student"], *SHORT, "--fsdp")


def test_fsdp_without_torchrun_and_other_world_size_on_resume_are_refused(toy_cache, tiny_models, tmp_path):
    with pytest.raises(KdcacheError, match="--fsdp needs a torchrun launch"):
        run_train(TrainConfig(cache=str(toy_cache), student=str(tiny_models["student"]), out=str(tmp_path / "r"),
                              steps=2, fsdp=True))
    run = tmp_path / "run"
    run_train(TrainConfig(cache=str(toy_cache), student=str(tiny_models["student"]), out=str(run), steps=2,
                          save_every=1, eval_rows=0))
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, "world_size": 2}))
    with pytest.raises(KdcacheError, match="world_size: 2 -> 1 ranks"):
        run_train(TrainConfig(cache=str(toy_cache), student=str(tiny_models["student"]), out=str(run), steps=2,
                              save_every=1, eval_rows=0, resume=True))
