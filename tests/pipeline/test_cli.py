import json
import shutil
import subprocess
import sys

from click.testing import CliRunner

from pipeline.cli import cli


def kdcache(*args: str) -> subprocess.CompletedProcess:
    """The real console entry point in a subprocess: exit code, stdout and stderr as a user sees them."""
    return subprocess.run([sys.executable, "-m", "pipeline", *args], capture_output=True, text=True, timeout=120)


def test_inspect_and_verify_on_a_written_cache(synthetic_cache):
    r = kdcache("inspect", str(synthetic_cache), "--json")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["top_k"] == 8 and summary["seq_len"] == 16
    assert summary["splits"]["train"]["code"]["rows"] == 7
    assert summary["total"]["tokens"] == 15 * 16
    assert summary["total"]["bytes_per_token"] > 0
    r = kdcache("inspect", str(synthetic_cache))
    assert r.returncode == 0 and "prose" in r.stdout and "B/token" in r.stdout
    r = kdcache("verify", str(synthetic_cache))
    assert r.returncode == 0 and r.stdout.startswith("OK ") and "5 shards" in r.stdout


def test_errors_are_one_line_exit_1(synthetic_cache, tmp_path):
    shard = next(synthetic_cache.rglob("shard-00000.parquet"))
    shard.write_bytes(shard.read_bytes()[:-10])
    for args in (["verify", str(synthetic_cache)], ["inspect", str(tmp_path / "missing")]):
        r = kdcache(*args)
        assert r.returncode == 1
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("Error: "), r.stderr
    r = kdcache("verify", str(synthetic_cache))
    assert str(shard) in r.stderr
    r = kdcache("--debug", "verify", str(synthetic_cache))
    assert r.returncode == 1 and "Traceback" in r.stderr


def test_usage_errors_exit_2():
    r = CliRunner().invoke(cli, ["verify"])
    assert r.exit_code == 2
    r = CliRunner().invoke(cli, ["train", "--cache", "c", "--student", "s", "--out", "o", "--loss", "nope"])
    assert r.exit_code == 2 and "nope" in r.output


def test_every_contract_command_is_present():
    for name in ("capture", "merge", "inspect", "verify", "profile", "train", "eval", "demo"):
        assert name in cli.commands
    r = CliRunner().invoke(cli, ["--help"])
    assert r.exit_code == 0


def test_console_script_installed():
    exe = shutil.which("kdcache") or str(__import__("pathlib").Path(sys.executable).parent / "kdcache")
    r = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "kdcache" in r.stdout


def test_eval_command_on_a_captured_cache(tiny_models, tmp_path):
    """`kdcache eval` end to end: HF capture of the tiny teacher, then the student evaluated against it."""
    from tests.helpers import domain_texts

    corpus = tmp_path / "code.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in domain_texts("code", 40, seed=1)))
    cache = tmp_path / "cache"
    r = kdcache("capture", "--teacher", str(tiny_models["teacher"]), "--data", f"code={corpus}", "--out", str(cache),
                "--backend", "hf", "--top-k", "8", "--seq-len", "32", "--val-fraction", "0.3")
    assert r.returncode == 0, r.stderr
    r = kdcache("eval", "--cache", str(cache), "--student", str(tiny_models["student"]), "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    code = report["domains"]["code"]
    assert report["split"] == "val" and code["tokens"] > 0 and code["kl"] > 0
    assert abs(code["ppl"] - __import__("math").exp(code["student_ce"])) < 1e-6 * code["ppl"]
    r = kdcache("eval", "--cache", str(cache), "--student", str(tiny_models["teacher"]))
    assert r.returncode == 0 and "mean" in r.stdout
    r = kdcache("eval", "--cache", str(cache), "--student", str(tmp_path / "nope"))
    assert r.returncode == 1 and r.stderr.startswith("Error: ") and "nope" in r.stderr
