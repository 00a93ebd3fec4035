"""docs/hf_trainer.md: the custom transformers.Trainer example runs as shown on a tiny real cache and distils.

The code block after the doc's `<!-- example: hf_trainer` marker is executed unchanged except for its three path
lines (CACHE, STUDENT, OUT) and, through a TrainingArguments subclass, a short CPU schedule (8 optimizer steps).
"""

import math
import re
import sys
from pathlib import Path

import pytest
import torch
from transformers import TrainingArguments

from cache_format import open_cache
from tests.trainer.test_evaluate import build_cache
from trainer.evaluate import evaluate
from trainer.losses import logits_loss
from trainer.student import load_student

DOC = Path(__file__).resolve().parents[2] / "docs" / "hf_trainer.md"
STEPS, GRAD_ACCUM = 8, 2
SHORT_RUN = dict(max_steps=STEPS, per_device_train_batch_size=4, gradient_accumulation_steps=GRAD_ACCUM,
                 learning_rate=1e-2, warmup_steps=0, weight_decay=0.0, bf16=False, use_cpu=True, logging_steps=1,
                 save_strategy="no", report_to=[], disable_tqdm=True, seed=0)


class ShortRunArguments(TrainingArguments):
    """Stands in for TrainingArguments while the example runs: its own values, then SHORT_RUN's on top.
    Module level because the Trainer pickles its args (training_args.bin) when saving."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **{**kwargs, **SHORT_RUN})


def example_code() -> str:
    text = DOC.read_text()
    m = re.search(r"<!-- example: hf_trainer\b.*?-->\s*```python\n(.*?)```", text, re.S)
    assert m, f"{DOC}: no ```python block after the '<!-- example: hf_trainer' marker"
    return m.group(1)


def with_paths(code: str, **paths: Path) -> str:
    for name, path in paths.items():
        code, n = re.subn(rf"^{name} = .*$", f"{name} = {str(path)!r}", code, flags=re.M)
        assert n == 1, f"{DOC}: expected one line '{name} = ...' in the example, found {n}"
    return code


@pytest.fixture(scope="module")
def train_cache(tiny_models, tmp_path_factory) -> Path:
    """A real cache of the tiny teacher (train split, K=8), so its tokenizer fingerprint matches the student's."""
    return build_cache(tmp_path_factory.mktemp("hf_trainer") / "cache", tiny_models["teacher"], K=8,
                       split="train", rows={"code": 4, "prose": 4})


def test_doc_example_distils(train_cache, tiny_models, tmp_path, monkeypatch):
    # transformers quirk: importing transformers.processing_utils (pulled in by Trainer and the models) re-executes
    # transformers/__init__.py and puts a new module object in sys.modules, so patch the current one, afterwards
    from transformers import Trainer  # noqa: F401

    monkeypatch.setattr(sys.modules["transformers"], "TrainingArguments", ShortRunArguments)
    from transformers import TrainingArguments as patched
    assert patched is ShortRunArguments
    cache = open_cache(train_cache)
    before, _ = load_student(str(tiny_models["student"]), cache.manifest, device="cpu")
    kl_before = evaluate(cache, before, split="train")["mean"]["kl"]

    out = tmp_path / "out"
    ns = {"__name__": "hf_trainer_example"}
    exec(compile(with_paths(example_code(), CACHE=train_cache, STUDENT=tiny_models["student"], OUT=out),
                 str(DOC), "exec"), ns)
    kd_trainer, model = ns["kd_trainer"], ns["model"]

    # it ran the whole schedule on the cache's batches, and the loss is finite and goes down
    assert kd_trainer.state.global_step == STEPS
    losses = [e["loss"] for e in kd_trainer.state.log_history if "loss" in e]
    assert len(losses) == STEPS and all(math.isfinite(x) and x > 0 for x in losses), losses
    assert sum(losses[-3:]) < sum(losses[:3]), losses
    # the student is closer to the teacher on the cache than before, and was saved with its tokenizer
    kl_after = evaluate(cache, model.eval(), split="train")["mean"]["kl"]
    assert kl_after < 0.8 * kl_before, (kl_before, kl_after)
    saved, _ = load_student(str(out), cache.manifest, device="cpu")
    assert evaluate(cache, saved, split="train")["mean"]["kl"] == pytest.approx(kl_after, rel=1e-5)

    # compute_loss's targets are the next tokens (its CE equals HF's own), its KD equals the simpler full-logits
    # logits_loss("fkl", ...) variant, and the doc's DDP-friendly hidden_states[-1] is the decoder's last_hidden_state
    batch = kd_trainer._prepare_inputs(next(iter(kd_trainer.get_train_dataloader())))   # as compute_loss gets it
    assert isinstance(batch["domains"], list) and len(batch["domains"]) == SHORT_RUN["per_device_train_batch_size"]
    with torch.no_grad():
        chunked, stats = kd_trainer.compute_loss(model, batch, return_outputs=True)
        hf_ce = model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss     # HF shifts labels itself
        assert batch["attention_mask"].all() and stats["ce_loss"].item() == pytest.approx(hf_ce.item(), rel=1e-5)
        mask = batch["loss_mask"]
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits       # (B, T, V)
        simple = logits_loss("fkl", logits[mask], batch["topk_ids"][mask], batch["topk_logprobs"][mask]).mean()
        assert chunked.item() == pytest.approx(simple.item(), rel=1e-3, abs=1e-7)
        last = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False,
                     output_hidden_states=True, logits_to_keep=1).hidden_states[-1]
        decoder = model.base_model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False)
        torch.testing.assert_close(last, decoder.last_hidden_state)
