import json
import shutil
import subprocess
import sys

import pytest
from click.testing import CliRunner

from pipeline.cli import cli
from tests.helpers import kdcache, kdcache_process


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


@pytest.mark.slow
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
    r = kdcache_process("--debug", "verify", str(synthetic_cache))          # the real process: exit 1, traceback
    assert r.returncode == 1 and "Traceback" in r.stderr and str(shard) in r.stderr


def test_usage_errors_exit_2():
    r = CliRunner().invoke(cli, ["verify"])
    assert r.exit_code == 2
    r = CliRunner().invoke(cli, ["train", "--cache", "c", "--student", "s", "--out", "o", "--loss", "nope"])
    assert r.exit_code == 2 and "nope" in r.output
    for args, missing in ((["capture", "--data", "a=b"], "--teacher"), (["train", "--cache", "c"], "--student"),
                          (["profile", "--cache", "c"], "--student"), (["eval", "--student", "s"], "--cache")):
        r = CliRunner().invoke(cli, args)
        assert r.exit_code == 2 and f"Missing option '{missing}'" in r.output, r.output


def test_every_contract_command_is_present():
    for name in ("capture", "merge", "inspect", "verify", "profile", "train", "eval", "demo"):
        assert name in cli.commands
    r = CliRunner().invoke(cli, ["--help"])
    assert r.exit_code == 0


@pytest.mark.slow
def test_console_script_installed():
    exe = shutil.which("kdcache") or str(__import__("pathlib").Path(sys.executable).parent / "kdcache")
    r = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "kdcache" in r.stdout


def test_eval_command_on_a_captured_cache(tiny_models, tmp_path):
    """`kdcache eval` end to end: HF capture of the tiny teacher, then the student evaluated against it."""
    from tests.toy import domain_texts

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


def test_eval_out_writes_the_report_with_its_config(toy_cache, tiny_models, tmp_path):
    out = tmp_path / "eval.json"
    r = kdcache("eval", "--cache", str(toy_cache), "--student", str(tiny_models["student"]), "--json",
                "--max-rows-per-domain", "2", "--out", str(out))
    assert r.returncode == 0, r.stderr
    saved = json.loads(out.read_text())
    assert {k: v for k, v in saved.items() if k != "config"} == json.loads(r.stdout)
    assert saved["config"]["max_rows_per_domain"] == 2 and saved["config"]["student"] == str(tiny_models["student"])


def files_under(path) -> list[str]:
    return sorted(str(p) for p in path.rglob("*"))


@pytest.mark.slow
def test_capture_dry_run_prints_the_plan_and_writes_nothing(tiny_models, tmp_path):
    from tests.toy import write_toy_corpus

    specs = write_toy_corpus(tmp_path / "corpus", 30, seed=2)
    data = [a for s in specs for a in ("--data", f"{s.domain}={s.path}")]
    args = ["capture", "--teacher", str(tiny_models["teacher"]), *data, "--backend", "hf", "--seq-len", "32",
            "--shard-size-mb", "0.01", "--top-k", "8"]
    before = files_under(tmp_path)
    r = kdcache(*args, "--out", str(tmp_path / "cache"), "--dry-run")
    assert r.returncode == 0, r.stderr
    assert files_under(tmp_path) == before                                  # nothing written, not even --out
    plan = dict(line.split(None, 1) for line in r.stdout.splitlines()[1:] if line[0] != " " and " " in line)
    r = kdcache(*args, "--out", str(tmp_path / "cache"))                     # the real capture agrees with the plan
    assert r.returncode == 0, r.stderr
    summary = json.loads(kdcache("inspect", str(tmp_path / "cache"), "--json").stdout)["total"]
    assert plan["tokens"] == f"{summary['tokens']:,}" and plan["rows"] == f"{summary['rows']:,}"
    assert "complete (nothing to do)" in kdcache(*args, "--out", str(tmp_path / "cache"), "--dry-run").stdout
    r = kdcache(*args, "--out", str(tmp_path / "cache"), "--top-k", "4", "--dry-run")      # refused as a run would be
    assert r.returncode == 1 and r.stderr.startswith("Error: ") and "other settings" in r.stderr


def test_train_dry_run_checks_the_inputs_and_writes_nothing(toy_cache, tiny_models, tmp_path):
    args = ["train", "--cache", str(toy_cache), "--student", str(tiny_models["student"]), "--steps", "10",
            "--batch-size", "4", "--grad-accum", "2", "--dry-run"]
    r = kdcache(*args, "--out", str(tmp_path / "run"))
    assert r.returncode == 0, r.stderr
    assert not (tmp_path / "run").exists()
    assert "tokens                             2,560" in r.stdout                 # 10 steps x 8 rows x 32 tokens
    assert "total bytes" in r.stdout and "epochs per domain" in r.stdout
    r = kdcache(*args, "--out", str(tmp_path / "run"), "--student", str(tmp_path / "missing"))
    assert r.returncode == 1 and r.stderr.strip().splitlines()[-1].startswith("Error: ")
    r = kdcache(*args, "--out", str(tmp_path / "run"), "--resume")
    assert r.returncode == 1 and "holds no training run" in r.stderr


@pytest.mark.slow
def test_config_file_fills_what_the_command_line_leaves(tiny_models, tmp_path):
    from tests.toy import write_toy_corpus

    specs = write_toy_corpus(tmp_path / "corpus", 10, seed=1)
    data = "".join(f"  {s.domain}: {s.path}\n" for s in specs)
    (tmp_path / "c.yaml").write_text(f"teacher: {tiny_models['teacher']}\nout: {tmp_path / 'cache'}\nbackend: hf\n"
                                     f"seq-len: 32\ntop_k: 8\ndata:\n{data}")
    r = CliRunner().invoke(cli, ["capture", "--config", str(tmp_path / "c.yaml"), "--top-k", "4", "--dry-run"])
    assert r.exit_code == 0, r.output
    assert "k 4, seq_len 32" in r.stdout and all(f"  {s.domain}" in r.stdout for s in specs)  # the command line wins
    (tmp_path / "bad.yaml").write_text("teacher: t\nout: o\nsteps_per_epoch: 3\n")
    r = CliRunner().invoke(cli, ["capture", "--config", str(tmp_path / "bad.yaml")])
    assert r.exit_code == 1 and "unknown option 'steps_per_epoch'" in r.stderr
    r = CliRunner().invoke(cli, ["train", "--config", str(tmp_path / "missing.yaml")])
    assert r.exit_code == 1 and "cannot read" in r.stderr and not (tmp_path / "cache").exists()


@pytest.mark.parametrize("command, line, expected", [
    ("capture", 'top_k: "abc"', "top_k: Invalid value for '--top-k': 'abc' is not a valid integer."),
    ("capture", "top_k: 16.7", "top_k: 16.7 is not a valid integer for --top-k"),
    ("capture", "top_k: true", "top_k: True is not a valid integer for --top-k"),
    ("capture", "top_k: [16]", "top_k: [16] is not a valid integer for --top-k"),
    ("capture", "backend: vllm2", "backend: Invalid value for '--backend': 'vllm2' is not one of"),
    ("train", "batch_size: 2.5", "batch_size: 2.5 is not a valid integer for --batch-size"),
    ("train", 'lr: "abc"', "lr: Invalid value for '--lr': 'abc' is not a valid float."),
    ("train", "adakd: 1", "adakd: 1 is not a valid boolean for --adakd"),
])
def test_config_values_are_typed_like_the_command_line(tmp_path, command, line, expected):
    """A wrong YAML type is one line naming the file, the option and the value, before anything is created."""
    (tmp_path / "c.yaml").write_text(line + "\n")
    out = tmp_path / "out"
    args = ["--teacher", "t", "--data", "d=x.jsonl"] if command == "capture" else ["--cache", "c", "--student", "s"]
    r = CliRunner().invoke(cli, [command, *args, "--out", str(out), "--config", str(tmp_path / "c.yaml")])
    assert r.exit_code == 1 and f"Error: {tmp_path / 'c.yaml'}: {expected}" in r.stderr, r.output
    assert not out.exists()


def test_config_strings_are_parsed_as_on_the_command_line(tiny_models, tmp_path):
    (tmp_path / "c.yaml").write_text('seq_len: "32"\ntop_k: "8"\nval_fraction: "0.5"\n')
    corpus = tmp_path / "d.jsonl"
    corpus.write_text('{"text": "the story said"}\n')
    r = CliRunner().invoke(cli, ["capture", "--teacher", str(tiny_models["teacher"]), "--data", f"d={corpus}",
                                 "--out", str(tmp_path / "out"), "--backend", "hf", "--config",
                                 str(tmp_path / "c.yaml"), "--dry-run"])
    assert r.exit_code == 0, r.output
    assert "k 8, seq_len 32" in r.stdout
