"""A full disk is one line naming the file being written, for capture's shards and train's checkpoints, with
nothing half-written kept; after space is freed the same command resumes. The disk: a small tmpfs this test mounts
(the suite runs as root on its hosts; a host that cannot mount one fails here rather than skipping)."""

import subprocess

import pytest
from click.testing import CliRunner

from cache_format import verify_cache
from pipeline.cli import cli
from tests.toy import write_toy_corpus


@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / "disk"
    mount.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.fail(f"cannot mount a small tmpfs for the disk-full tests: {r.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=True)


def error_line(result) -> str:
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    return lines[0]


@pytest.mark.slow
def test_capture_onto_a_full_disk(small_disk, tiny_models, tmp_path):
    (small_disk / "filler").write_bytes(b"\0" * (1536 << 10))                 # leaves about 512 KiB
    specs = write_toy_corpus(tmp_path / "corpus", 300, seed=2)
    args = ["capture", "--teacher", str(tiny_models["teacher"]), "--out", str(small_disk / "cache"), "--backend",
            "hf", "--top-k", "64", "--codec", "v1", "--seq-len", "64", "--shard-size-mb", "0.1",
            *[a for s in specs for a in ("--data", f"{s.domain}={s.path}")]]
    line = error_line(CliRunner().invoke(cli, args))
    assert line.startswith(f"Error: {small_disk / 'cache'}/") and "no space left on the device while writing it" \
        in line, line
    assert not list(small_disk.rglob("*.tmp"))
    r = CliRunner().invoke(cli, [*args[:4], str(tmp_path / "cache"), *args[5:]])           # room enough
    assert r.exit_code == 0, r.output
    verify_cache(tmp_path / "cache")


@pytest.mark.slow
def test_train_checkpoint_onto_a_full_disk(small_disk, toy_cache, tiny_models):
    """Room for one checkpoint (440 KiB) and not two: the second fails, the first survives and --resume goes on."""
    (small_disk / "filler").write_bytes(b"\0" * (1300 << 10))                 # leaves about 750 KiB
    args = ["train", "--cache", str(toy_cache), "--student", str(tiny_models["student"]), "--out",
            str(small_disk / "run"), "--steps", "4", "--save-every", "2", "--batch-size", "2", "--eval-rows", "0"]
    line = error_line(CliRunner().invoke(cli, args))
    assert line.startswith(f"Error: {small_disk / 'run'}/") and "no space left on the device while writing it" \
        in line, line
    assert not list(small_disk.rglob("*.tmp"))
    assert "step-00000004" in line and (small_disk / "run" / "checkpoints" / "step-00000002").is_dir()
    (small_disk / "filler").unlink()
    r = CliRunner().invoke(cli, [*args, "--resume"])
    assert r.exit_code == 0, r.output
    assert (small_disk / "run" / "final").is_dir()
