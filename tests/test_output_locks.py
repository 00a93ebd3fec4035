"""One writer per output: a capture, a merge or a train run into an output another live process is writing is
refused with one line naming the holder; a lock left by a dead process is taken over with a warning."""

import logging
import multiprocessing
import os
import time

import pytest

from cache_format import KdcacheError, storage


def _hold(path, ready, release):
    with storage.exclusive(path, "kdcache capture"):
        ready.set()
        release.wait(30)


def test_a_second_writer_is_refused_naming_the_holder(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    ready, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold, args=(str(tmp_path / "cache"), ready, release))
    holder.start()
    try:
        assert ready.wait(60)
        with pytest.raises(KdcacheError) as e:
            with storage.exclusive(tmp_path / "cache", "kdcache capture"):
                pass
        msg = str(e.value)
        assert "\n" not in msg and msg.startswith(f"{tmp_path / 'cache'}: another run is writing it (kdcache capture, "
                                                  f"pid {holder.pid} on ")
    finally:
        release.set()
        holder.join(30)
    with storage.exclusive(tmp_path / "cache", "kdcache capture"):         # free again once it has finished
        assert (tmp_path / "cache.lock").exists()
    assert not (tmp_path / "cache.lock").exists()


def test_the_lock_of_a_dead_process_is_taken_over_with_a_warning(tmp_path, caplog):
    ctx = multiprocessing.get_context("spawn")
    ready, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold, args=(str(tmp_path / "run"), ready, release))
    holder.start()
    assert ready.wait(60)
    os.kill(holder.pid, 9)                       # killed: its lock file stays, its flock goes with it
    holder.join(30)
    assert (tmp_path / "run.lock").read_text().startswith("kdcache capture, pid")
    with caplog.at_level(logging.WARNING, logger="kdcache"):
        with storage.exclusive(tmp_path / "run", "kdcache train"):
            time.sleep(0.01)
    assert "taking over the lock of a run that ended without releasing it (kdcache capture, pid" in caplog.text


@pytest.mark.parametrize("command", ["train", "merge"])
def test_train_and_merge_take_the_lock_of_their_output(toy_cache, tiny_models, tmp_path, command):
    from click.testing import CliRunner

    from pipeline.cli import cli
    out = tmp_path / "out"
    args = (["train", "--cache", str(toy_cache), "--student", str(tiny_models["student"]), "--out", str(out),
             "--steps", "1"] if command == "train" else ["merge", str(toy_cache), "--out", str(out)])
    with storage.exclusive(out, "kdcache capture"):
        r = CliRunner().invoke(cli, args)
    assert r.exit_code == 1 and f"Error: {out}: another run is writing it (kdcache capture, pid {os.getpid()}" \
        in r.stderr, r.output
    assert not out.exists()
