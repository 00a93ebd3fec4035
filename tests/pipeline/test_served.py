"""The served teacher's parsing of vLLM's prompt_logprobs JSON, on hand-built answers of both endpoints (the real
servers: test_capture_served.py)."""

import json

import numpy as np
import pytest

from pipeline.served import COMPLETIONS, GENERATE, parse_prompt_logprobs


def answer(endpoint: str, positions: list) -> bytes:
    """A server's JSON for prompt_logprobs `positions` (entry 0 is null, as vLLM writes it)."""
    logprobs = [None] + [{str(i): {"logprob": lp, "rank": rank, "decoded_token": None} for i, lp, rank in p}
                         for p in positions]
    body = {"prompt_logprobs": logprobs} if endpoint == GENERATE else {"choices": [{"prompt_logprobs": logprobs}]}
    return json.dumps(body).encode()


@pytest.mark.parametrize("endpoint", [GENERATE, COMPLETIONS])
def test_parse_puts_entries_in_rank_order_and_finds_the_actual_token(endpoint):
    ids = np.array([5, 7, 2, 9])
    positions = [
        [(7, -0.5, 2), (3, -0.1, 1), (8, -2.0, 3)],           # the actual token (7) inside the top-3: 3 entries
        [(2, -6.0, 40), (1, -0.2, 1), (4, -1.0, 2), (6, -9999.0, 3)],   # outside: 4 entries, the actual first
        [(9, -0.3, 1), (0, -1.5, 2), (5, -2.5, 3)],
    ]
    topk_ids, topk_lps, target = parse_prompt_logprobs(endpoint, answer(endpoint, positions), ids, 3)
    np.testing.assert_array_equal(topk_ids, [[3, 7, 8], [1, 4, 6], [9, 0, 5], [0, 0, 0]])
    np.testing.assert_allclose(topk_lps[:3], [[-0.1, -0.5, -2.0], [-0.2, -1.0, -np.inf], [-0.3, -1.5, -2.5]])
    assert np.isneginf(topk_lps[3]).all() and np.isnan(target[3])             # the last position holds none
    np.testing.assert_allclose(target[:3], [-0.5, -6.0, -0.3])


@pytest.mark.parametrize("positions", [
    [[(7, -0.5, 1), (3, -0.1, 2)]],                            # 2 entries for k = 3
    [[(1, -0.5, 1), (3, -0.1, 2), (4, -0.2, 3)]],              # the actual token (7) missing
    [[(7, -0.5, 1), (3, -0.1, 1), (4, -0.2, 3)]],              # rank 1 twice
])
def test_parse_refuses_a_layout_it_does_not_know(positions):
    with pytest.raises(RuntimeError, match="unexpected prompt_logprobs layout"):
        parse_prompt_logprobs(GENERATE, answer(GENERATE, positions), np.array([5, 7]), 3)


def test_a_url_that_is_not_a_vllm_server_is_refused_in_one_line(tmp_path):
    import http.server
    import threading

    from cache_format import KdcacheError
    from pipeline.served import ServedTeacher
    from tests.toy import build_tokenizer

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)   # 404s
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}"
    try:
        with pytest.raises(KdcacheError) as e:
            ServedTeacher((url + "/v1",), build_tokenizer(tmp_path / "tok"), 8, 64)      # an OpenAI base URL
    finally:
        httpd.shutdown()
    assert str(e.value).startswith(f"--teacher-url {url}: not a vLLM OpenAI-compatible server of a model "
                                   "(HTTPStatusError: Client error '404") and "\n" not in str(e.value)
