"""The engines' building blocks: block top-k, chunked log_softmax + top-k, HF batching without padding waste,
PendingRows, and capture's tokenizer prefetch thread."""

import numpy as np
import pytest
import torch

from pipeline.capture import _prefetched
from pipeline.teachers import HFTeacher, PendingRows, block_topk, topk_logprobs


@pytest.mark.parametrize("V,k", [(2048, 64), (5000, 8), (32000, 64), (40003, 16), (1000, 64)])
def test_block_topk_equals_torch_topk(V, k):
    g = torch.Generator().manual_seed(V)
    x = torch.randn(37, V, generator=g) * 3                                # (N, V), distinct values
    x[0, -5:] += 100                                                       # top-k in the tail columns
    x[1, :k] += 100                                                        # top-k all in the first blocks
    values, ids = block_topk(x, k)
    want, want_ids = x.topk(k, dim=-1)
    torch.testing.assert_close(values, want, rtol=0, atol=0)
    torch.testing.assert_close(ids, want_ids, rtol=0, atol=0)


def test_chunked_topk_logprobs_equal_the_whole():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(50, 3000, generator=g) * 4                        # (N, V)
    next_ids = torch.randint(0, 3000, (50,), generator=g)
    ids, lps, target = topk_logprobs(lambda sl: logits[sl], next_ids, 3000, 16, chunk_elements=7 * 3000)
    lp = torch.log_softmax(logits, -1)
    want, want_ids = lp.topk(16, -1)
    assert ids.dtype == torch.int32 and lps.dtype == torch.float32 and target.shape == (50,)
    torch.testing.assert_close(lps, want)
    assert torch.equal(ids.long(), want_ids)
    torch.testing.assert_close(target, lp.gather(-1, next_ids[:, None])[:, 0])


def test_topk_logprobs_computes_only_the_kept_positions():
    """keep: the logits of the other positions are never asked for, and they hold no distribution."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(40, 500, generator=g)                             # (N, V)
    next_ids = torch.randint(0, 500, (40,), generator=g)
    keep = torch.rand(40, generator=g) < 0.3
    asked = []
    ids, lps, target = topk_logprobs(lambda sl: asked.append(sl) or logits[sl], next_ids, 500, 8,
                                     chunk_elements=5 * 500, keep=keep)
    assert torch.equal(torch.cat(asked), keep.nonzero()[:, 0])
    full_ids, full_lps, full_target = topk_logprobs(lambda sl: logits[sl], next_ids, 500, 8)
    assert torch.equal(ids[keep], full_ids[keep]) and torch.equal(lps[keep], full_lps[keep])
    assert torch.equal(target[keep], full_target[keep])
    assert (ids[~keep] == 0).all() and torch.isneginf(lps[~keep]).all() and torch.isnan(target[~keep]).all()


def test_pending_rows_split_rows_and_add_the_last_position():
    lengths = [4, 1, 3]                                                    # N = 3 + 0 + 2 positions
    ids = np.arange(10, dtype=np.int32).reshape(5, 2)
    rows = PendingRows(ids, -ids.astype(np.float32), np.arange(5, dtype=np.float32), lengths).rows()
    assert [r[0].shape for r in rows] == [(4, 2), (1, 2), (3, 2)]
    np.testing.assert_array_equal(rows[2][0][:2], ids[3:])
    assert np.isneginf(rows[0][1][-1]).all() and np.isnan(rows[1][2]).all()
    np.testing.assert_array_equal(rows[0][2][:3], [0, 1, 2])


def test_hf_batch_of_unequal_rows_equals_rows_alone(tiny_models):
    """A short row in the batch is padded and masked; every row's result equals that row run alone."""
    teacher = HFTeacher(str(tiny_models["teacher"]), dtype="float32")
    rng = np.random.default_rng(0)
    rows = [rng.integers(0, teacher.vocab_size, size=n).astype(np.int32) for n in (24, 24, 9, 24)]
    batched = teacher.topk(rows, 8).rows()
    for row, (ids, lps, target) in zip(rows, batched):
        (ids1, lps1, target1), = teacher.topk([row], 8).rows()
        assert ids.shape == (len(row), 8)
        np.testing.assert_allclose(lps, lps1, atol=1e-5)
        np.testing.assert_allclose(target, target1, atol=1e-5)
        assert (ids[:-1] == ids1[:-1]).mean() > 0.99                       # ties aside
    teacher.close()


def test_prefetched_yields_all_in_order_and_raises_the_producers_error():
    assert list(_prefetched(iter(range(100)), 3)) == list(range(100))

    def broken():
        yield 1
        raise ValueError("bad document 7")

    got = []
    with pytest.raises(ValueError, match="bad document 7"):
        for x in _prefetched(broken(), 2):
            got.append(x)
    assert got == [1]


@pytest.mark.parametrize("family", ["gemma3", "gemma2", "granite", "phi"])
def test_hf_teacher_never_asks_for_the_whole_logits(family, tmp_path):
    """At V = 262k (Gemma 3) and for heads with soft-cap, scaling or a bias: the model's output projection is
    never called on the batch (its (B, T, V) logits would be 34 GB at 32 x 1024 for Gemma 3); kdcache applies the
    head per chunk of positions and gets the model's own log-probabilities."""
    from tests.toy import build_family, build_tokenizer
    model = build_family(tmp_path / "m", family, build_tokenizer(tmp_path / "tok"), hidden=64, layers=1)
    teacher = HFTeacher(str(tmp_path / "m"), dtype="float32")
    calls = []
    hook = teacher.model.get_output_embeddings().register_forward_hook(lambda *a: calls.append(1))
    rows = [np.arange(1, 40, dtype=np.int32), np.arange(7, 30, dtype=np.int32)]
    got = teacher.topk(rows, 8).rows()
    hook.remove()
    assert not calls
    for r, (ids, lps, target) in zip(rows, got):
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.from_numpy(r[None]).long()).logits[0].float(), -1)   # (T, V)
        want, want_ids = lp[:-1].topk(8, -1)
        torch.testing.assert_close(torch.from_numpy(lps[:-1]), want, atol=1e-4, rtol=0)
        assert (torch.from_numpy(ids[:-1]).long() == want_ids).float().mean() > 0.99
        next_ids = torch.from_numpy(r[1:, None]).long()
        torch.testing.assert_close(torch.from_numpy(target[:-1]), lp[:-1].gather(-1, next_ids)[:, 0], atol=1e-4,
                                   rtol=0)
