"""`kdcache capture`'s options: one frozen dataclass, checked on construction (one-line KdcacheError naming the
option), with the codec it asks for and the shard geometry it implies."""

from dataclasses import dataclass

from cache_format import KdcacheError, TopkV1, TopkV2, TopkV3

from .corpus import DataSpec, Reading

DEFAULT_KL_SCALE = {"v2": 0.015, "v3": 0.013}   # the rule when no --top-p/--kl-budget/--kl-scale (docs/benchmarks.md)
# options that change how the engine runs, not what the cache holds (at most float rounding: model parallelism,
# vLLM's output path): a re-run may change them freely
RUNTIME_OPTIONS = ("out", "gpu_memory_utilization", "tensor_parallel_size", "pipeline_parallel_size", "vllm_output",
                   "enforce_eager", "teacher_url", "max_concurrency", "request_timeout", "drop_server_after")
# options naming where an input is: compared on resume and merge by the input's fingerprint (identity_diff)
LOCATIONS = ("teacher", "data", "chat_template", "tokenizer")
# in-process engine options that a served teacher cannot take (its servers run with their own), with their defaults
ENGINE_OPTIONS = {"dtype": "auto", "gpu_memory_utilization": None, "tensor_parallel_size": 1,
                  "pipeline_parallel_size": 1, "vllm_output": "auto", "enforce_eager": False}


@dataclass(frozen=True)
class CaptureConfig:
    teacher: str | None                 # the teacher's model directory, or None with teacher_url
    data: tuple[DataSpec, ...]
    out: str
    backend: str | None = None          # None: vllm when it can run, else hf
    top_k: int = 64                     # the cap on entries per position (topk targets)
    codec: str | None = None            # "v3": topk-v3 (sorted ids, one code for the flat part); "v2": topk-v2
                                        # (quantised, adaptive k); "v1": topk-v1 (int32 + float32); None: v3, or v2
                                        # for --targets sampled and --top-p (see codec_name)
    top_p: float | None = None          # v2 rule: keep the smallest prefix with this mass
    kl_budget: float | None = None      # v2/v3 rule: extra KL (nats) allowed per position
    kl_scale: float | None = None       # v2/v3 rule: the same, kl_scale x the row's truncation-KL bound; the default
    targets: str = "topk"               # "topk", or "sampled": --samples draws from the teacher (RS-KD)
    samples: int = 50
    seq_len: int = 1024
    val_fraction: float = 0.02
    split_seed: int = 0
    max_tokens_per_domain: int | None = None
    batch_size: int = 32                # rows per engine call
    dtype: str = "auto"
    text_field: str = "text"
    num_workers: int = 1
    worker_index: int = 0
    shard_size_mb: float = 256.0        # target shard size (sets rows per shard)
    gpu_memory_utilization: float | None = None
    tensor_parallel_size: int = 1       # vLLM: GPUs that split each layer (one node)
    pipeline_parallel_size: int = 1     # vLLM: stages the layers are split into (GPUs or nodes)
    vllm_output: str = "auto"           # vLLM: "hidden" states out (head + top-k here), "logprobs", "auto"
    enforce_eager: bool = False         # vLLM: no torch.compile, no CUDA graphs (starts faster)
    format: str = "auto"                # records: text, chat (messages), prompt-completion; auto: per record
    train_on: str = "assistant"         # conversations' trained tokens: assistant, last-assistant, all
    chat_template: str | None = None    # a Jinja file (or chat_template.json) instead of the tokenizer's
    train_reasoning: bool = True        # conversations: an assistant turn's reasoning is trained with its reply
    packing: str | None = None          # concat or isolated; None: isolated when the corpus holds conversations
    teacher_url: tuple[str, ...] = ()   # vLLM servers of the teacher, instead of --teacher (pipeline/served.py)
    tokenizer: str | None = None        # with teacher_url: the teacher's tokenizer (a directory)
    max_concurrency: int = 8            # teacher_url: requests in flight per server
    request_timeout: float = 600.0      # teacher_url: seconds before a request counts as failed
    drop_server_after: float = 60.0     # teacher_url: seconds of failed requests before a server is dropped

    def __post_init__(self):
        served = bool(self.teacher_url)
        checks = [
            (served or bool(self.teacher), "no teacher: give --teacher PATH, or --teacher-url URL with --tokenizer"),
            (not (served and self.teacher), "give --teacher (a model directory) or --teacher-url (vLLM servers), "
                                            "not both"),
            (not served or bool(self.tokenizer), "--teacher-url needs --tokenizer PATH (the served teacher's "
                                                 "tokenizer, checked against each server)"),
            (not served or self.backend in (None, "vllm", "served"),
             f"--backend {self.backend}: a served teacher is vLLM"),
            (not served or self.targets == "topk", "--targets sampled needs the full distribution: use --teacher "
                                                   "with --backend hf (a server returns only the top-k)"),
            *[(not served or getattr(self, name) == default,
               f"--{name.replace('_', '-')} sets up an in-process engine; a served teacher runs with its servers' "
               f"own options") for name, default in ENGINE_OPTIONS.items()],
            (self.max_concurrency >= 1, f"--max-concurrency must be >= 1, got {self.max_concurrency}"),
            (self.request_timeout > 0, f"--request-timeout must be > 0, got {self.request_timeout}"),
            (self.drop_server_after >= 0, f"--drop-server-after must be >= 0, got {self.drop_server_after}"),
            (self.top_k > 0, f"--top-k must be > 0, got {self.top_k}"),
            (self.seq_len >= 2, f"--seq-len must be >= 2, got {self.seq_len}"),
            (0.0 <= self.val_fraction < 1.0, f"--val-fraction must be in [0, 1), got {self.val_fraction}"),
            (self.batch_size > 0, f"--batch-size must be > 0, got {self.batch_size}"),
            (self.num_workers >= 1, f"--num-workers must be >= 1, got {self.num_workers}"),
            (0 <= self.worker_index < self.num_workers,
             f"--worker-index must be in [0, {self.num_workers}), got {self.worker_index}"),
            (self.max_tokens_per_domain is None or self.max_tokens_per_domain > 0,
             f"--max-tokens-per-domain must be > 0, got {self.max_tokens_per_domain}"),
            (self.shard_size_mb > 0, f"--shard-size-mb must be > 0, got {self.shard_size_mb}"),
            (self.tensor_parallel_size >= 1, f"--tensor-parallel-size must be >= 1, got {self.tensor_parallel_size}"),
            (self.pipeline_parallel_size >= 1,
             f"--pipeline-parallel-size must be >= 1, got {self.pipeline_parallel_size}"),
            (len(self.data) > 0, "no --data given (use --data DOMAIN=PATH, repeatable)"),
            (len({d.domain for d in self.data}) == len(self.data), "a domain is given twice in --data"),
            (self.codec in (None, "v1", "v2", "v3"), f"--codec must be v1, v2 or v3, got {self.codec!r}"),
            (self.targets in ("topk", "sampled"), f"--targets must be topk or sampled, got {self.targets!r}"),
            (self.vllm_output in ("auto", "hidden", "logprobs"),
             f"--vllm-output must be auto, hidden or logprobs, got {self.vllm_output!r}"),
            (self.top_p is None or 0 < self.top_p <= 1, f"--top-p must be in (0, 1], got {self.top_p}"),
            (self.kl_budget is None or self.kl_budget >= 0, f"--kl-budget must be >= 0, got {self.kl_budget}"),
            (self.kl_scale is None or self.kl_scale >= 0, f"--kl-scale must be >= 0, got {self.kl_scale}"),
            (0 < self.samples <= 255, f"--samples must be in 1..255, got {self.samples}"),
            (self.codec_name != "v1" or (self.kl_budget is None and self.kl_scale is None),
             "--kl-budget and --kl-scale need --codec v2 or v3"),
            (self.codec_name == "v2" or (self.targets == "topk" and self.top_p is None),
             "--targets sampled and --top-p need --codec v2"),
            (self.targets == "topk" or self.backend != "vllm",
             "--targets sampled needs the full distribution: use --backend hf (vLLM returns only the top-k)"),
        ]
        Reading(self.format, self.train_on, None, self.packing or "concat")       # checks the three names
        for ok, msg in checks:
            if not ok:
                raise KdcacheError(msg)

    @property
    def width(self) -> int:
        """K, the entries per position in the cache: --top-k, or --samples for sampled targets."""
        return self.samples if self.targets == "sampled" else self.top_k

    @property
    def codec_name(self) -> str:
        """--codec, else v3, or v2 where only v2 can store what is asked (sampled targets, a top-p rule)."""
        if self.codec is not None:
            return self.codec
        return "v2" if self.targets == "sampled" or self.top_p is not None else "v3"

    def make_codec(self, vocab_size: int) -> TopkV1 | TopkV2 | TopkV3:
        if self.codec_name == "v1":
            return TopkV1(top_k=self.top_k)
        rule = {"top_p": self.top_p, "kl_budget": self.kl_budget, "kl_scale": self.kl_scale}
        if not any(v is not None for v in rule.values()):
            rule["kl_scale"] = DEFAULT_KL_SCALE[self.codec_name]
        if self.codec_name == "v3":
            return TopkV3(top_k=self.top_k, vocab_size=vocab_size, kl_budget=rule["kl_budget"],
                          kl_scale=rule["kl_scale"])
        return TopkV2(top_k=self.width, vocab_size=vocab_size, targets=self.targets, samples=self.samples,
                      **(rule if self.targets == "topk" else {}))

    @property
    def token_bytes_bound(self) -> int:
        """Bytes per token before compression: K entries of 8 (v1) or about 3 (v2, v3) bytes, plus 8."""
        return (8 if self.codec_name == "v1" else 3) * self.width + 8

    @property
    def rows_per_shard(self) -> int:
        return max(1, int(self.shard_size_mb * 2**20) // (self.seq_len * self.token_bytes_bound))

    @property
    def row_group_rows(self) -> int:
        return max(1, min(self.rows_per_shard, 65536 // self.seq_len))
