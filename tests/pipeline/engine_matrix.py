"""The engine matrix's worker process: `python -m tests.pipeline.engine_matrix MODELS CORPUS OUT [--wrong-head]
FAMILY...` captures the same corpus with each family's teacher (MODELS/FAMILY) three times: vLLM with --vllm-output
auto (the hidden-states fast path behind its guard), vLLM with logprobs, and HF, into OUT/FAMILY/{auto,logprobs,hf}.
With --wrong-head, then, for the first family, with kdcache's head for it made wrong on purpose (scaled by 1/2): auto
must fall back to logprobs (OUT/wrong-head/auto) and hidden must refuse (its error line in OUT/wrong-head/hidden.txt).

One process for all: vLLM's engine core runs in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0) and eager, so an engine
starts in seconds, with a fixed small KV cache; the engines' numerics are those of a normal capture."""

import dataclasses
import gc
import os
import sys
from pathlib import Path

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
os.environ["VLLM_CPU_KVCACHE_SPACE"] = "1"              # GiB: the engines share this process's memory


def capture(teacher: Path, corpus: Path, out: Path, backend: str, output: str = "auto"):
    from pipeline.capture import run_capture
    from pipeline.config import CaptureConfig
    from pipeline.corpus import DataSpec
    gc.freeze()           # vLLM collects garbage a dozen times per engine start: keep the long-lived heap out of it
    return run_capture(CaptureConfig(teacher=str(teacher), data=(DataSpec("text", str(corpus)),), out=str(out),
                                     backend=backend, top_k=16, seq_len=64, val_fraction=0.0, batch_size=4,
                                     kl_budget=0.0,          # the default codec with every listed entry valued
                                     dtype="float32", gpu_memory_utilization=0.05, vllm_output=output,
                                     enforce_eager=True))


def main(models: Path, corpus: Path, out: Path, families: list[str], wrong_head: bool) -> None:
    from cache_format import KdcacheError
    from pipeline import teachers

    for family in families:        # HF first: vLLM's transformers backend (e.g. for Phi) patches the HF classes
        capture(models / family, corpus, out / family / "hf", "hf")
    for family in families:
        for output in ("auto", "logprobs"):
            capture(models / family, corpus, out / family / output, "vllm", output)
    if not wrong_head:
        return
    right = teachers.output_head
    teachers.output_head = lambda path: dataclasses.replace(right(path), scale=right(path).scale / 2)
    capture(models / families[0], corpus, out / "wrong-head" / "auto", "vllm", "auto")
    try:
        capture(models / families[0], corpus, out / "wrong-head" / "hidden", "vllm", "hidden")
    except KdcacheError as e:
        (out / "wrong-head" / "hidden.txt").write_text(str(e))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), [f for f in sys.argv[4:] if f != "--wrong-head"],
         "--wrong-head" in sys.argv)
