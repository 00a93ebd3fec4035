import os
import subprocess
from pathlib import Path

import pytest

from tests.helpers import write_synthetic_cache
from tests.toy import build_llama, build_tokenizer


def pytest_configure(config):
    """`make test-fast` (KDCACHE_TEST_FAST=1, -m "not slow"): a test that starts a process fails, naming it."""
    if os.environ.get("KDCACHE_TEST_FAST"):
        def refuse(self, args, *_, **__):
            raise RuntimeError(f"make test-fast: a test started a process ({args!r}); mark it @pytest.mark.slow")
        subprocess.Popen.__init__ = refuse


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """A tiny tokenizer plus a teacher (2 layers, d=64) and a student (1 layer, d=32) that share it."""
    root = tmp_path_factory.mktemp("models")
    tok = build_tokenizer(root / "tokenizer")
    V, eos = len(tok), tok.eos_token_id
    paths = {"tokenizer": root / "tokenizer", "teacher": root / "teacher", "student": root / "student"}
    build_llama(paths["teacher"], V, hidden=64, layers=2, seed=1, eos_id=eos)
    build_llama(paths["student"], V, hidden=32, layers=1, seed=2, eos_id=eos)
    for name in ("teacher", "student"):
        tok.save_pretrained(paths[name])
    return paths


@pytest.fixture
def synthetic_cache(tmp_path) -> Path:
    """A small finished cache with two domains and several shards of several row groups."""
    write_synthetic_cache(tmp_path / "cache", {"code": 7, "prose": 4})
    return tmp_path / "cache"


@pytest.fixture(scope="session")
def toy_cache(tiny_models, tmp_path_factory) -> Path:
    """A real cache: the tiny teacher's top-16 over 4 toy domains (HF engine, rows of 32 tokens, 20 % val)."""
    from pipeline.capture import run_capture
    from pipeline.config import CaptureConfig
    from tests.toy import write_toy_corpus

    root = tmp_path_factory.mktemp("toy")
    specs = write_toy_corpus(root / "corpus", 60, seed=3)
    run_capture(CaptureConfig(teacher=str(tiny_models["teacher"]), data=tuple(specs), out=str(root / "cache"),
                              backend="hf", top_k=16, seq_len=32, val_fraction=0.2, shard_size_mb=0.02))
    return root / "cache"
