"""A teacher behind vLLM's OpenAI-compatible servers (`capture --teacher-url URL ...`): the results of an
in-process engine (topk(rows, k, doc_lengths) -> rows(), see teachers.py) from requests spread over a fleet.

Before any work every server is checked (ServedTeacher.__init__): its tokenizer against the local one (/tokenize on
a probe text), the model's vocabulary size (the largest token id it accepts), its max_model_len against --seq-len,
and the teacher's top-k on a fixed probe, whose fingerprint every server must share (it is the cache's teacher
fingerprint: a resume or a merge with another teacher is refused). Requests carry token ids and ask for the prompt's
top-k log-probabilities through the fastest endpoint the server offers: vLLM's token-in/token-out
`/inference/v1/generate` (servers started with --enable-scale-out or --tokens-only: no detokenisation) or else
`/v1/completions` with `prompt_logprobs`. Each server takes up to `max_concurrency` requests at once; a failed
request (timeout, connection error, 5xx) is retried on the least loaded server in good health, a failing server
waits out a growing back-off, and one that has failed for `drop_after` seconds is dropped with a warning. The
capture fails (KdcacheError) only when no server is left.
"""

import hashlib
import json
import logging
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import httpx
import msgspec
import numpy as np

from cache_format import KdcacheError

from .teachers import Joined, TopkRow, fast_path_disagreement, split_documents, with_last_position

log = logging.getLogger("kdcache")
logging.getLogger("httpx").setLevel(logging.WARNING)          # not a line per request
GENERATE, COMPLETIONS = "/inference/v1/generate", "/v1/completions"
# the probe every server runs: identity of the tokenizer (/tokenize) and of the teacher (its top-k on these tokens)
PROBE_TEXT = ("Knowledge distillation trains a small student to match a large teacher's predictions, token by "
              "token.\ndef add(a, b):\n    return a + b  # 12 + 30 = 42\n"
              "Le chat dort. Der Hund läuft. 日本語のテキスト。")
PROBE_TOKENS = 64
RETRY_STATUS = {408, 429, 500, 502, 503, 504}     # answers worth retrying (elsewhere); other errors stop the capture


class _Entry(msgspec.Struct):
    logprob: float
    rank: int | None = None


class _Generated(msgspec.Struct):                  # /inference/v1/generate
    prompt_logprobs: list[dict[int, _Entry] | None]


class _Choice(msgspec.Struct):
    prompt_logprobs: list[dict[int, _Entry] | None]


class _Completion(msgspec.Struct):                 # /v1/completions
    choices: list[_Choice]


_DECODERS = {GENERATE: msgspec.json.Decoder(_Generated), COMPLETIONS: msgspec.json.Decoder(_Completion)}


def request_body(endpoint: str, model: str, ids: list[int], k: int) -> dict:
    """One prompt of token ids, one generated token, the prompt's top-k log-probabilities (no text)."""
    if endpoint == GENERATE:
        return {"model": model, "token_ids": ids,
                "sampling_params": {"max_tokens": 1, "prompt_logprobs": k, "detokenize": False}}
    return {"model": model, "prompt": ids, "max_tokens": 1, "prompt_logprobs": k}


def parse_prompt_logprobs(endpoint: str, content: bytes, ids: np.ndarray, k: int) -> TopkRow:
    """A server's answer for the prompt `ids` (T,) -> the row's topk_ids (T, K), topk_logprobs (T, K) and
    target_logprobs (T,) as the in-process engines give them. Entry t >= 1 of prompt_logprobs is the distribution
    that predicted token t (the row's position t-1): a dict {id: {logprob, rank}} holding the top-k (ranks 1..k) and
    the actual token, which is one more entry when it is outside the top-k. The server writes -inf as -9999."""
    decoded = _DECODERS[endpoint].decode(content)
    positions = (decoded.prompt_logprobs if endpoint == GENERATE else decoded.choices[0].prompt_logprobs)[1:]
    P = len(ids) - 1
    if len(positions) != P:
        raise RuntimeError(f"the server returned {len(positions)} positions for a prompt of {len(ids)} tokens")
    counts = np.fromiter(map(len, positions), np.int64, P)                    # (P,)
    n = int(counts.sum())
    entry_ids = np.fromiter((i for d in positions for i in d), np.int64, n)   # (n,)
    values = np.fromiter((e.logprob for d in positions for e in d.values()), np.float64, n)
    ranks = np.fromiter((e.rank or 0 for d in positions for e in d.values()), np.int64, n)
    values[values <= -9999.0] = -np.inf
    position = np.repeat(np.arange(P), counts)                                # (n,) each entry's position
    actual = entry_ids == np.repeat(ids[1:], counts)                          # (n,) the token that came next
    in_topk = ~(actual & np.repeat(counts == k + 1, counts))                  # the extra entry is not in the top-k
    cell = position[in_topk] * k + ranks[in_topk] - 1
    if not (np.isin(counts, (k, k + 1)).all() and np.bincount(position[actual], minlength=P).max(initial=1) == 1
            and actual.sum() == P and np.array_equal(np.sort(cell), np.arange(P * k))):
        raise RuntimeError(f"unexpected prompt_logprobs layout from the server: {sorted(set(counts.tolist()))} "
                           f"entries per position for k={k}")
    topk_ids, topk_lps = np.zeros(P * k, np.int32), np.zeros(P * k, np.float32)
    topk_ids[cell], topk_lps[cell] = entry_ids[in_topk], values[in_topk]
    target = np.zeros(P, np.float32)
    target[position[actual]] = values[actual]
    return with_last_position(topk_ids.reshape(P, k), topk_lps.reshape(P, k), target)


@dataclass
class Server:
    """One vLLM server and what the fleet knows of it."""
    url: str
    client: httpx.Client
    model: str = ""
    version: str = ""
    endpoint: str = COMPLETIONS
    vocab_size: int = 0
    in_flight: int = 0
    failures: int = 0                  # consecutive failed requests
    failing_since: float | None = None
    retry_at: float = 0.0              # no request before this (back-off after a failure)
    alive: bool = True

    def get(self, path: str) -> dict:
        r = self.client.get(path)
        r.raise_for_status()
        return r.json()

    def post(self, path: str, body: dict) -> httpx.Response:
        return self.client.post(path, content=msgspec.json.encode(body), headers={"content-type": "application/json"})


class ServedTeacher:
    """The teacher behind one or more vLLM servers, checked and agreed (see the module docstring)."""

    engine = "vllm-served"
    logprobs_mode = "raw_logprobs"
    output = "logprobs"
    dtype = "server"                    # the servers' own (not exposed by their API)

    def __init__(self, urls: tuple[str, ...], tokenizer, k: int, seq_len: int, max_concurrency: int = 8,
                 request_timeout: float = 600.0, drop_after: float = 60.0):
        self.k, self.max_concurrency, self.drop_after = k, max_concurrency, drop_after
        timeout = httpx.Timeout(request_timeout, connect=10.0)
        limits = httpx.Limits(max_connections=max_concurrency, max_keepalive_connections=max_concurrency)
        key = os.environ.get("VLLM_API_KEY")                   # the servers' --api-key (vLLM reads the same variable)
        headers = {"authorization": f"Bearer {key}"} if key else {}
        bases = [u.rstrip("/").removesuffix("/v1") for u in urls]   # an OpenAI base URL (.../v1) names the server too
        servers = [Server(b, httpx.Client(base_url=b, timeout=timeout, limits=limits, headers=headers)) for b in bases]
        probe = np.asarray(tokenizer.encode(PROBE_TEXT, add_special_tokens=False)[:PROBE_TOKENS], np.int64)
        self.servers, reference = [], None
        try:
            for server in servers:
                try:
                    row = self._check(server, tokenizer, probe, seq_len)
                except httpx.TransportError as e:
                    log.warning("--teacher-url %s: cannot reach the server (%s): going on without it", server.url, e)
                    server.client.close()
                    continue
                except (httpx.HTTPStatusError, ValueError, KeyError, IndexError) as e:
                    why = str(e).splitlines()[0]
                    raise KdcacheError(f"--teacher-url {server.url}: not a vLLM OpenAI-compatible server of a model "
                                       f"({type(e).__name__}: {why})") from None
                if reference is None:
                    reference, self.vocab_size = (row, server.vocab_size), server.vocab_size
                else:
                    self._agree(server, row, reference)
                self.servers.append(server)
        except BaseException:
            for server in servers:
                server.client.close()
            raise
        if not self.servers:
            raise KdcacheError(f"--teacher-url: none of the {len(urls)} servers can be reached")
        first = self.servers[0]
        self.name, self.engine_version = first.model, f"vllm {first.version}"
        top1 = reference[0][0][:-1, 0]
        self.fingerprint = "served:" + hashlib.sha256(json.dumps(
            {"vocab_size": self.vocab_size, "probe": probe.tolist(), "top1": top1.tolist()}).encode()).hexdigest()
        log.info("teacher %s on %d server(s) (vLLM %s, vocabulary %d, endpoint %s)", self.name, len(self.servers),
                 first.version, self.vocab_size, ", ".join(sorted({s.endpoint for s in self.servers})))
        self._lock = threading.Condition()
        self._pool = ThreadPoolExecutor(max_concurrency * len(self.servers), thread_name_prefix="kdcache-request")
        self._last_error = ""

    @property
    def concurrency(self) -> int:
        """Requests the fleet can have in flight (capture keeps enough rows waiting to fill them)."""
        return self.max_concurrency * len(self.servers)

    def _check(self, server: Server, tokenizer, probe: np.ndarray, seq_len: int) -> TopkRow:
        """Identify `server` (model, version, endpoint, vocabulary) and refuse it when its tokenizer differs from
        the local one or its max_model_len is too short; its top-k on the probe."""
        model = server.get("/v1/models")["data"][0]
        server.model, server.version = model["id"], server.get("/version")["version"]
        if model.get("max_model_len") and model["max_model_len"] < seq_len + 1:
            raise KdcacheError(f"--teacher-url {server.url}: the server's max_model_len is {model['max_model_len']}, "
                               f"--seq-len {seq_len} needs {seq_len + 1} (a row and the one token generated; above "
                               f"the model's max_position_embeddings vLLM wants VLLM_ALLOW_LONG_MAX_MODEL_LEN=1, safe "
                               f"here: that token is never fed back)")
        for text, special in ((PROBE_TEXT, False), (PROBE_TEXT, True), (tokenizer.eos_token, False)):
            r = server.post("/tokenize", {"model": server.model, "prompt": text, "add_special_tokens": special})
            if not r.is_success:
                raise KdcacheError(f"--teacher-url {server.url}: /tokenize failed ({r.status_code}: {_message(r)}); "
                                   f"kdcache checks the server's tokenizer against --tokenizer")
            theirs, ours = r.json()["tokens"], tokenizer.encode(text, add_special_tokens=special)
            if theirs != ours:
                raise KdcacheError(f"--teacher-url {server.url}: the server's tokenizer differs from --tokenizer "
                                   f"(/tokenize of {text[:30]!r}: {str(theirs)[:60]}, --tokenizer: {str(ours)[:60]})")
        ok = server.post(GENERATE, request_body(GENERATE, server.model, probe[:2].tolist(), 1)).is_success
        server.endpoint = GENERATE if ok else COMPLETIONS
        server.vocab_size = self._vocab_size(server, len(tokenizer))
        r = server.post(server.endpoint, request_body(server.endpoint, server.model, probe.tolist(), self.k))
        if not r.is_success:
            raise KdcacheError(f"--teacher-url {server.url}: the probe request failed ({r.status_code}: "
                               f"{_message(r)})")
        return parse_prompt_logprobs(server.endpoint, r.content, probe, self.k)

    def _vocab_size(self, server: Server, tokenizer_size: int) -> int:
        """The model's vocabulary size: one more than the largest token id the server accepts in a prompt (vLLM
        accepts ids below max(tokenizer size, model vocabulary)); found by doubling, then bisection."""
        def accepted(i: int) -> bool:
            r = server.post(server.endpoint, request_body(server.endpoint, server.model, [i], 1))
            if r.status_code >= 500:
                r.raise_for_status()
            return r.is_success

        if not accepted(tokenizer_size - 1):
            raise KdcacheError(f"--teacher-url {server.url}: the server refuses token id {tokenizer_size - 1} of "
                               f"--tokenizer ({tokenizer_size} tokens)")
        lo, step = tokenizer_size - 1, 1                                   # lo: accepted; hi: refused
        while accepted(lo + step):
            lo, step = lo + step, step * 2
        hi = lo + step
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if accepted(mid) else (lo, mid)
        return hi

    def _agree(self, server: Server, row: TopkRow, reference: tuple[TopkRow, int]) -> None:
        """Refuse `server` unless it serves the first server's teacher: the same vocabulary, the same top-1 on
        every probe position and log-probs within bf16 rounding."""
        (ref, vocab), first = reference, self.servers[0].url
        if server.vocab_size != vocab:
            raise KdcacheError(f"--teacher-url {server.url}: vocabulary of {server.vocab_size} ids, {first} has "
                               f"{vocab}: not the same teacher")
        why = fast_path_disagreement([ref], [row], "bfloat16")
        differ = int((ref[0][:-1, 0] != row[0][:-1, 0]).sum())
        if why or differ:
            why = why or f"top-1 differs at {differ} positions"
            raise KdcacheError(f"--teacher-url {server.url} ({server.model}) does not serve the teacher of {first} "
                               f"({self.servers[0].model}): on the probe, {why}")

    def topk(self, rows: list[np.ndarray], k: int, doc_lengths: list | None = None,
             supervised: list | None = None) -> Joined:
        """Every document of the rows as one request, all submitted at once; rows() waits for them."""
        docs, _, counts = split_documents(rows, doc_lengths or [None] * len(rows))
        return Joined(_Requests([self._pool.submit(self._request, doc) for doc in docs]), counts)

    def _request(self, ids: np.ndarray) -> TopkRow:
        if len(ids) < 2:                                                   # a lone token predicts nothing
            return with_last_position(np.zeros((0, self.k)), np.zeros((0, self.k)), np.zeros(0))
        while True:
            server = self._acquire()
            error = None
            try:
                r = server.post(server.endpoint, request_body(server.endpoint, server.model, ids.tolist(), self.k))
                if r.is_success:
                    return parse_prompt_logprobs(server.endpoint, r.content, ids, self.k)
                if r.status_code not in RETRY_STATUS:
                    raise KdcacheError(f"--teacher-url {server.url} refused a request of {len(ids)} tokens "
                                       f"({r.status_code}: {_message(r)})")
                error = f"HTTP {r.status_code}: {_message(r)}"
            except httpx.TransportError as e:                              # connection refused or lost, timeout
                error = f"{type(e).__name__}: {e}"
            finally:
                self._release(server, error)

    def _acquire(self) -> Server:
        """The least loaded live server with a free slot and no back-off pending (waits for one)."""
        with self._lock:
            while True:
                alive = [s for s in self.servers if s.alive]
                if not alive:
                    raise KdcacheError(f"--teacher-url: every server is down (last error: {self._last_error}); "
                                       f"finished shards are kept: re-run the same command to resume")
                now = time.monotonic()
                ready = [s for s in alive if s.in_flight < self.max_concurrency and s.retry_at <= now]
                if ready:
                    server = min(ready, key=lambda s: s.in_flight)
                    server.in_flight += 1
                    return server
                self._lock.wait(max(0.01, min(s.retry_at for s in alive) - now))

    def _release(self, server: Server, error: str | None) -> None:
        with self._lock:
            server.in_flight -= 1
            now = time.monotonic()
            if error is None:
                server.failures, server.failing_since = 0, None
            elif server.alive:
                self._last_error = f"{server.url}: {error}"
                server.failures += 1
                server.failing_since = server.failing_since or now
                server.retry_at = now + min(10.0, 0.25 * 2 ** server.failures)
                if now - server.failing_since >= self.drop_after:
                    server.alive = False
                    left = sum(s.alive for s in self.servers)
                    log.warning("--teacher-url %s: dropped after failing for %.0fs (%s); %d server(s) left",
                                server.url, now - server.failing_since, error, left)
            self._lock.notify_all()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        for server in self.servers:
            server.client.close()


class _Requests:
    """Futures of per-document results; rows() waits for them in order."""

    def __init__(self, futures: list[Future]):
        self.futures = futures

    def rows(self) -> list[TopkRow]:
        return [f.result() for f in self.futures]


def _message(r: httpx.Response) -> str:
    try:
        body = r.json()
        return str(body.get("error", {}).get("message") or body.get("message") or body)[:300]
    except ValueError:
        return r.text[:300]

