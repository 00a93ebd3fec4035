"""Random-Sampling KD targets (papers.md §3): the bucketed fkl on sampled targets is an unbiased estimate of the
full-vocabulary KD loss (up to a student-independent offset) and of its gradient; biased uses are refused."""

import pytest
import torch

from cache_format import KdcacheError, TopkV2
from pipeline.teachers import sample_targets
from tests.helpers import write_synthetic_cache
from trainer.losses import check_sampled_targets, logits_loss


def draws(p_logits: torch.Tensor, n: int, m: int, seed: int = 0):
    """m independent sets of n draws from softmax(p_logits): ids (m, n), log(c / n) (m, n)."""
    lp = torch.log_softmax(p_logits, -1).expand(m, -1)
    return sample_targets(lp, n, torch.Generator().manual_seed(seed))


def test_sample_targets_counts():
    ids, lp = draws(torch.randn(30), 20, 500)
    valid = torch.isfinite(lp)
    counts = (lp.exp() * 20).round()
    assert (counts.sum(-1) == 20).all()
    assert (counts[:, 1:] <= counts[:, :-1]).all()                                   # sorted by count
    assert all(len(set(r[v].tolist())) == int(v.sum()) for r, v in zip(ids, valid))  # distinct ids


def test_fkl_on_sampled_targets_is_unbiased():
    """E[grad fkl(p_hat)] = grad KL(p || q) = q - p, and E[fkl(p_hat) + H(p_hat)] = H(p, q) (cross-entropy), each
    within 4 standard errors over m draws; a top-k truncation of the same teacher is visibly biased."""
    torch.manual_seed(0)
    V, n, m = 40, 16, 20000
    p_logits, z = torch.randn(V) * 2, torch.randn(V)
    p, q = torch.softmax(p_logits, -1), torch.softmax(z, -1)
    ids, lp = draws(p_logits, n, m)
    student = z.expand(m, -1).clone().requires_grad_(True)
    loss = logits_loss("fkl", student, ids, lp)                                           # (m,)
    loss.sum().backward()
    grads = student.grad.double()                                                    # (m, V) per-draw gradients
    mean, se = grads.mean(0), grads.std(0) / m**0.5
    assert ((mean - (q - p).double()).abs() <= 4 * se + 1e-7).all()

    h_hat = -(lp.exp() * torch.where(torch.isfinite(lp), lp, 0.0)).sum(-1)          # H(p_hat), (m,)
    value = (loss.detach() + h_hat).double()
    cross = -(p * torch.log_softmax(z, -1)).sum().double()                          # H(p, q)
    assert abs(value.mean() - cross) <= 4 * value.std() / m**0.5

    k = 4                                                                            # the biased reference
    top = torch.log_softmax(p_logits, -1).topk(k)
    biased = z.clone().requires_grad_(True)
    logits_loss("fkl", biased[None], top.indices[None], top.values[None] - top.values.logsumexp(-1))[0].backward()
    assert ((biased.grad - (q - p)).abs() > 4 * se.float()).any()


def test_check_sampled_targets():
    sampled = TopkV2(top_k=8, vocab_size=64, targets="sampled", samples=8).params()
    check_sampled_targets(sampled, "fkl", 1.0)
    check_sampled_targets(sampled, "ce", 2.0)
    check_sampled_targets(TopkV2(top_k=8, vocab_size=64).params(), "rkl", 2.0, adakd=True)   # top-k: anything
    check_sampled_targets({"name": "topk-v1"}, "jsd", 1.0)
    with pytest.raises(KdcacheError, match="--loss rkl: .*sampled"):
        check_sampled_targets(sampled, "rkl", 1.0)
    with pytest.raises(KdcacheError, match="--temperature 2.0"):
        check_sampled_targets(sampled, "fkl", 2.0)
    with pytest.raises(KdcacheError, match="--adakd"):
        check_sampled_targets(sampled, "fkl", 1.0, adakd=True)


def test_train_refuses_a_biased_loss_on_a_sampled_cache(tmp_path, tiny_models):
    from trainer.config import TrainConfig
    from trainer.train import run_train

    codec = TopkV2(top_k=8, vocab_size=64, targets="sampled", samples=8)
    write_synthetic_cache(tmp_path / "c", {"code": 3}, T=16, K=8, V=64, codec=codec)   # rows: any log-probs
    with pytest.raises(KdcacheError, match="sampled targets"):
        run_train(TrainConfig(cache=str(tmp_path / "c"), student=str(tiny_models["student"]),
                              out=str(tmp_path / "run"), loss="rkl", steps=1))
