"""The teacher matrix: every family kdcache's vLLM fast path knows, as a tiny random model at its real vocabulary size
with its head options (tied or untied, embed_out, bias, soft-cap, logit scaling, MoE body) and large logits,
captured by vLLM (auto: the guarded hidden-states output; logprobs) and by HF with the default codec (topk-v3) at
--kl-budget 0, so that every listed entry keeps its own value, each cache checked against a direct full-vocabulary
forward of the transformers model."""

from pathlib import Path

import numpy as np
import pytest
import torch

from cache_format import open_cache, verify_cache
from cache_format.codec_v2 import SQRT_SCALE
from tests.toy import FAMILIES, build_family, build_tokenizer, domain_texts
from tests.helpers import run_side_by_side

pytestmark = pytest.mark.slow
WORKERS = 2


@pytest.fixture(scope="module")
def matrix(tmp_path_factory) -> Path:
    """MODELS/FAMILY (each family's teacher) and OUT/FAMILY/{auto,logprobs,hf} (its three caches) under one root."""
    root = tmp_path_factory.mktemp("families")
    tokenizer = build_tokenizer(root / "tokenizer")
    for i, family in enumerate(FAMILIES):
        build_family(root / "models" / family, family, tokenizer, seed=i)
    corpus = root / "prose.jsonl"
    corpus.write_text("".join('{"text": "%s"}\n' % t for t in domain_texts("prose", 12, seed=1)))
    families = list(FAMILIES)                     # WORKERS side by side, each with a share of the families
    run_side_by_side({f"worker-{i}": ["-m", "tests.pipeline.engine_matrix", root / "models", corpus, root / "out",
                                      *(["--wrong-head"] if i == 0 else []), *families[i::WORKERS]]
                      for i in range(WORKERS)}, root)
    return root


def agreement(cache_dir: Path, model) -> dict:
    """The cache against log_softmax of the model's full logits on the same rows: top-1 agreement, the share of kept
    ids that are among the exact top-k_t, and the largest log-prob error beyond the codec's bound (sqrt(depth) / 51
    per entry, plus the normaliser's share: the row's largest entry bound and the tail code's step)."""
    top1 = kept = inside = positions = 0
    excess = 0.0
    for row in open_cache(cache_dir).iter_rows("train"):
        n = len(row["input_ids"]) - 1
        ids, lps, target = row["topk_ids"][:n], row["topk_logprobs"][:n], row["target_logprobs"][:n]
        with torch.no_grad():
            exact = torch.log_softmax(model(torch.tensor(row["input_ids"][None], dtype=torch.long)).logits[0].float(),
                                      -1)                                                            # (T, V)
        order = exact[:n].topk(ids.shape[1], dim=-1).indices.numpy()                                 # (n, K)
        exact = exact.numpy()
        k_t = np.isfinite(lps).sum(1)                                                                # (n,)
        top1 += int((ids[:, 0] == order[:, 0]).sum())
        inside += sum(len(set(ids[t, :k]) & set(order[t, :k])) for t, k in enumerate(k_t))
        kept, positions = kept + int(k_t.sum()), positions + n
        true = np.take_along_axis(exact[:n], ids.astype(np.int64), 1)                               # (n, K)
        depth = np.maximum(true[:, :1] - true, 0)
        bound = np.sqrt(depth) / SQRT_SCALE + 0.25 / SQRT_SCALE ** 2
        bound = bound + np.where(np.isfinite(lps), bound, 0).max(1, keepdims=True) + 1 / 256 + 1e-3
        excess = max(excess, float(np.where(np.isfinite(lps), np.abs(lps - true) - bound, -1).max()))
        exact_target = exact[np.arange(n), row["input_ids"][1:]]
        slack = bound.max(1) + np.abs(exact_target) * 2 ** -10                   # float16 targets outside the top-k
        excess = max(excess, float((np.abs(target - exact_target) - slack).max()))
    return {"top1": top1 / positions, "overlap": inside / kept, "excess": excess}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_engine_matches_a_direct_forward(matrix, family):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(matrix / "models" / family, dtype=torch.float32).eval()
    outputs = {}
    for name in ("auto", "logprobs", "hf"):
        cache = matrix / "out" / family / name
        verify_cache(cache)
        outputs[name] = open_cache(cache).manifest.teacher.output
        got = agreement(cache, model)
        assert got["top1"] >= 0.99 and got["overlap"] >= 0.95 and got["excess"] <= 0, (name, got)
    # auto took the fast path (its guard passed); the others are what they were asked to be
    assert outputs == {"auto": "hidden", "logprobs": "logprobs", "hf": ""}


def test_a_wrong_head_is_caught_by_the_guard(matrix):
    """kdcache's head for the first family made wrong on purpose (logits halved): auto captured through vLLM's
    log-probs instead, and the cache is still right; hidden refused with one line saying why."""
    from transformers import AutoModelForCausalLM

    family = next(iter(FAMILIES))
    cache = matrix / "out" / "wrong-head" / "auto"
    assert open_cache(cache).manifest.teacher.output == "logprobs"
    model = AutoModelForCausalLM.from_pretrained(matrix / "models" / family, dtype=torch.float32).eval()
    got = agreement(cache, model)
    assert got["top1"] >= 0.99 and got["excess"] <= 0, got
    error = (matrix / "out" / "wrong-head" / "hidden.txt").read_text()
    assert error.startswith("--vllm-output hidden: kdcache's output head for ['Qwen2ForCausalLM'] disagrees with "
                            "vLLM's log-probs") and "median |log p| difference" in error and "\n" not in error
    assert not (matrix / "out" / "wrong-head" / "hidden").exists()


@pytest.mark.parametrize("backend", ["hf", "vllm"])
def test_a_teacher_neither_engine_can_use_is_refused_before_any_work(matrix, backend, tmp_path):
    """One `Error:` line naming the teacher and what is wrong, and nothing written, for each engine."""
    import json
    import shutil

    from tests.helpers import kdcache
    from tests.pipeline.test_capture import one_line_error

    def teacher(name: str, **config) -> Path:
        path = tmp_path / name
        shutil.copytree(matrix / "models" / "llama3", path)
        (path / "config.json").write_text(json.dumps({**json.loads((path / "config.json").read_text()), **config}))
        return path

    no_weights = teacher("no-weights")
    (no_weights / "model.safetensors").unlink()
    cases = {
        teacher("unknown", architectures=["FooForCausalLM"], model_type="foo"):
            "architecture FooForCausalLM (model_type 'foo') is not one",
        teacher("small-vocab", vocab_size=300): "config.json has vocab_size 300, below its tokenizer's 384 tokens",
        no_weights: "no weights (no .safetensors or .bin file)",
        matrix / "models" / "llama3": "--top-k 200000 is above the teacher's vocabulary size 128256",
    }
    for path, needle in cases.items():
        out = tmp_path / f"out-{path.name}"
        r = kdcache("capture", "--teacher", path, "--data", f"prose={matrix / 'prose.jsonl'}", "--out", out,
                    "--backend", backend, "--seq-len", 64, "--top-k", 200000 if "top-k" in needle else 16)
        expected = f"Error: {needle}" if needle.startswith("--top-k") else f"Error: --teacher {path}: {needle}"
        assert one_line_error(r).startswith(expected), r.stderr[-2000:]
        assert not out.exists()
