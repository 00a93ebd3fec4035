"""Capture's model-parallel options: validated, passed to vLLM only, and not part of the cache's identity."""

import pytest
from click.testing import CliRunner

from pipeline.capture import _engine_options
from pipeline.config import RUNTIME_OPTIONS, CaptureConfig
from pipeline.cli import cli
from pipeline.corpus import DataSpec


@pytest.mark.parametrize("extra, message", [
    (["--pipeline-parallel-size", "0"], "--pipeline-parallel-size must be >= 1, got 0"),
    (["--tensor-parallel-size", "-1"], "--tensor-parallel-size must be >= 1, got -1"),
    (["--backend", "hf", "--tensor-parallel-size", "2"], "--tensor-parallel-size 2 / --pipeline-parallel-size 1: "
                                                         "model parallelism needs --backend vllm (got hf)"),
    (["--backend", "hf", "--pipeline-parallel-size", "2"], "model parallelism needs --backend vllm"),
])
def test_bad_parallel_sizes_are_refused_in_one_line(extra, message, tiny_models, toy_cache, tmp_path):
    r = CliRunner().invoke(cli, ["capture", "--teacher", str(tiny_models["teacher"]), "--data",
                                 f"code={toy_cache.parent / 'corpus' / 'code.jsonl'}", "--out", str(tmp_path / "c"),
                                 "--seq-len", "32", *extra])
    assert r.exit_code == 1 and r.output.strip().count("\n") == 0 and message in r.output, r.output
    assert not (tmp_path / "c" / "manifest.json").exists()


def test_parallel_sizes_reach_the_vllm_engine_only():
    cfg = CaptureConfig(teacher="t", data=(DataSpec("code", "x"),), out="o", backend="vllm", tensor_parallel_size=4,
                        pipeline_parallel_size=2, vllm_output="logprobs")
    assert _engine_options(cfg) == {"gpu_memory_utilization": None, "tensor_parallel_size": 4,
                                    "pipeline_parallel_size": 2, "output": "logprobs", "enforce_eager": False}
    assert _engine_options(CaptureConfig(teacher="t", data=cfg.data, out="o", backend="hf")) == {}
    # the same cache up to float rounding (the two vLLM outputs: test_capture_vllm)
    assert {"tensor_parallel_size", "pipeline_parallel_size", "vllm_output", "enforce_eager"} <= set(RUNTIME_OPTIONS)
