"""`kdcache eval --generate N`: ROUGE-L of generated replies against a chat cache's reference replies (AdaKD's
measure).

A chat (or prompt-completion) cache supervises position t when token t+1 is a trained response token. Within one
document of a row (documents start where position_ids == 0), the last run [s, e) of supervised positions is the
document's last assistant reply:
    prompt     doc tokens [doc_start, s + 1)       everything the model saw before the reply
    reference  tokens [s + 1, e + 1)               the reply, normally ending with the end-of-turn token
The model answers each prompt greedily (the default) or by sampling (Decoding: temperature, top-p, several seeded
draws, as AdaKD's protocol scores replies: temperature 1, top-p 1, the mean of 5 seeds); replies and references are decoded without special tokens and scored with
rouge-score's ROUGE-L F1 (stemmed, in [0, 1]). A text document (trained from its first token: no prompt) has no
reply to answer: text domains are left out, and a split without any conversation is refused.
"""

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import torch

from cache_format import Cache, KdcacheError

N_EXAMPLES = 3      # decoded (prompt, reference, reply) triples kept per domain in the report


def _documents(position_ids: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) of each document of a row, from its (T,) position_ids (a document starts at 0)."""
    starts = np.flatnonzero(position_ids == 0).tolist()
    return list(zip(starts, [*starts[1:], len(position_ids)]))


def _last_run(mask: np.ndarray) -> tuple[int, int] | None:
    """[s, e) of the last run of True in a (n,) bool mask; None when it has none."""
    idx = np.flatnonzero(mask)
    if not len(idx):
        return None
    e = int(idx[-1]) + 1
    gaps = np.flatnonzero(~mask[:e])
    return (int(gaps[-1]) + 1 if len(gaps) else 0), e


def last_replies(cache: Cache, split: str, domain: str, n: int) -> list[tuple[list[int], list[int]]]:
    """Up to n (prompt ids, reference reply ids) pairs of split/domain in cache order: one per document with a
    supervised position after a prompt, its last reply (module doc). A document trained from its first token (a
    text document, or a conversation captured with --train-on all) has no prompt and gives none."""
    pairs: list[tuple[list[int], list[int]]] = []
    if n <= 0:
        return pairs
    for row in cache.iter_rows(split, domain):
        ids, sup = row["input_ids"], row["supervised"]                    # (T,) int32, (T,) bool
        for a, b in _documents(row["position_ids"]):
            run = _last_run(sup[a:b])
            if run is None:
                continue
            s, e = a + run[0], a + run[1]
            if s == a:
                continue
            pairs.append((ids[a:s + 1].tolist(), ids[s + 1:e + 1].tolist()))
            if len(pairs) == n:
                return pairs
    return pairs


@dataclass(frozen=True)
class Decoding:
    """How replies are generated: greedy (temperature None, the default), or `samples` seeded draws from the
    student's softmax at `temperature`, cut to its top-p nucleus (AdaKD's protocol: temperature 1, top-p 1, 5
    samples). Draw s of a prompt set uses a generator seeded with seed + s."""

    temperature: float | None = None
    top_p: float = 1.0
    samples: int = 1
    seed: int = 0

    @property
    def sampled(self) -> bool:
        return self.temperature is not None


def sample_next(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> torch.Tensor:
    """(B, V) logits -> (B, 1) ids drawn from softmax(logits / temperature) restricted to its top-p nucleus, as
    transformers' sampling does it (TemperatureLogitsWarper, then TopPLogitsWarper with min_tokens_to_keep 1, then
    torch.multinomial): ascending sort, drop the ids whose cumulative probability is <= 1 - top_p, keep the most
    likely one always."""
    scores = logits.float() / temperature                                            # (B, V)
    if top_p < 1:
        ascending, order = scores.sort(dim=-1)                                       # (B, V)
        drop = ascending.softmax(-1).cumsum(-1) <= 1 - top_p                         # (B, V) in sorted order
        drop[:, -1] = False
        scores = scores.masked_fill(drop.scatter(1, order, drop), -math.inf)
    return torch.multinomial(scores.softmax(-1), 1, generator=generator)             # (B, 1)


@torch.no_grad()
def generate_replies(model, prompts: list[list[int]], max_new_tokens: int, stop_ids, device=None,
                     batch_size: int = 8, vocab_size: int | None = None, temperature: float | None = None,
                     top_p: float = 1.0, seed: int = 0) -> list[list[int]]:
    """The model's continuation of each prompt: at most max_new_tokens ids, cut before the first id in stop_ids
    (which is not returned). Greedy (argmax) when temperature is None, else sample_next with one generator seeded
    with `seed` for the whole call: reproducible for the same prompts and batch_size. Batches are left-padded with
    an attention mask and decoded with the KV cache; a plain loop, so no generation_config setting (repetition
    penalty, top-k, ...) applies. device: where the prompts go (None: the model's device). vocab_size: ids from here
    on (the extra rows of a padded embedding) are never chosen (None: any logit)."""
    stop_set = {int(i) for i in stop_ids}
    if not stop_set:
        raise ValueError("generate_replies needs at least one stop id")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    stop = torch.tensor(sorted(stop_set), dtype=torch.long, device=device)
    generator = None if temperature is None else torch.Generator(device).manual_seed(seed)
    was_training = model.training
    model.eval()
    replies: list[list[int]] = []
    try:
        for i in range(0, len(prompts), batch_size):
            batch = prompts[i:i + batch_size]
            B, L = len(batch), max(len(p) for p in batch)
            ids = torch.zeros((B, L), dtype=torch.long)                               # (B, L) left-padded
            mask = torch.zeros((B, L), dtype=torch.long)                              # (B, L) 1 = real token
            for j, p in enumerate(batch):
                ids[j, L - len(p):] = torch.tensor(p, dtype=torch.long)
                mask[j, L - len(p):] = 1
            ids, mask = ids.to(device), mask.to(device)
            pos = (mask.cumsum(-1) - 1).clamp(min=0)                                  # (B, L) 0 at each prompt
            past, new = None, []
            done = torch.zeros(B, dtype=torch.bool, device=device)                   # (B,) hit a stop id
            for _ in range(max_new_tokens):
                out = model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=past,
                            use_cache=True)
                past = out.past_key_values
                logits = out.logits[:, -1, :vocab_size]                               # (B, V)
                ids = logits.argmax(-1, keepdim=True) if generator is None else \
                    sample_next(logits, temperature, top_p, generator)               # (B, 1)
                new.append(ids)
                done |= torch.isin(ids[:, 0], stop)
                if done.all():
                    break
                mask = torch.cat([mask, mask.new_ones((B, 1))], dim=1)                # (B, L + t)
                pos = pos[:, -1:] + 1                                                 # (B, 1)
            for row in torch.cat(new, dim=1).tolist():                               # (B, <= max_new_tokens)
                cut = next((k for k, t in enumerate(row) if t in stop_set), len(row))
                replies.append(row[:cut])
    finally:
        model.train(was_training)
    return replies


def rouge_l(predictions: list[str], references: list[str]) -> float:
    """Mean ROUGE-L F1 in [0, 1] of predictions against references (rouge-score, Porter-stemmed; no download)."""
    from rouge_score import rouge_scorer

    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions vs {len(references)} references")
    if not predictions:
        raise ValueError("rouge_l needs at least one prediction")
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return float(np.mean([scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references)]))


def reply_stop_ids(manifest_eos: int, tokenizer, model, references: list[list[int]]) -> set[int]:
    """Where a reply ends: the cache's, the tokenizer's and the model's generation_config EOS ids, plus each
    reference's final token when it is a special token (the chat template's end-of-turn)."""
    ids = {int(manifest_eos)}
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(int(i) for i in ([gen_eos] if isinstance(gen_eos, int) else gen_eos or []))
    special = set(tokenizer.all_special_ids)
    ids.update(ref[-1] for ref in references if ref and ref[-1] in special)
    return ids


def generation_report(cache: Cache, model, tokenizer, split: str, n: int, max_new_tokens: int, device=None,
                      batch_size: int = 8, decoding: Decoding = Decoding()) -> dict:
    """{"decoding": asdict(decoding), "domains": {D: {"rouge_l", "n", "examples": [{"prompt", "reference", "reply"}]
    (the first 3, of the first draw)}}, "mean": {"rouge_l" (each domain counts once), "n" (summed)}} for the model's
    replies (greedy, or decoding.samples sampled draws) to up to n last replies per domain of split; domains without
    one (text) are left out. With sampling, rouge_l is the mean over the draws, and each domain and the mean also
    hold "rouge_l_samples" (one score per draw) and "rouge_l_std" (their standard deviation, ddof 1; 0 for one
    draw). KdcacheError when no domain has a reply."""
    domains = cache.domains(split)
    report: dict = {"decoding": dataclasses.asdict(decoding), "domains": {}, "mean": {}}
    for domain in domains:
        pairs = last_replies(cache, split, domain, n)
        if not pairs:
            continue
        prompts, refs = [p for p, _ in pairs], [r for _, r in pairs]
        stops = reply_stop_ids(cache.manifest.tokenizer.eos_id, tokenizer, model, refs)
        ref_text = tokenizer.batch_decode(refs, skip_special_tokens=True)
        scores, examples = [], []
        for draw in range(decoding.samples):
            replies = generate_replies(model, prompts, max_new_tokens, stops, device, batch_size,
                                       vocab_size=cache.manifest.tokenizer.vocab_size,
                                       temperature=decoding.temperature, top_p=decoding.top_p,
                                       seed=decoding.seed + draw)
            reply_text = tokenizer.batch_decode(replies, skip_special_tokens=True)
            scores.append(rouge_l(reply_text, ref_text))
            examples = examples or [{"prompt": tokenizer.decode(p, skip_special_tokens=True), "reference": r,
                                     "reply": g} for p, r, g in zip(prompts[:N_EXAMPLES], ref_text, reply_text)]
        report["domains"][domain] = {**_scores(scores, decoding), "n": len(pairs), "examples": examples}
    if not report["domains"]:
        raise KdcacheError(f"{cache.root}: --generate needs conversations (a chat or prompt-completion domain: "
                           f"replies after a prompt), split {split!r} has none "
                           f"(domains: {', '.join(domains) or 'none'})")
    per = report["domains"].values()
    draws = [float(np.mean(s)) for s in zip(*[d.get("rouge_l_samples", [d["rouge_l"]]) for d in per])]
    report["mean"] = {**_scores(draws, decoding), "n": sum(d["n"] for d in per)}
    return report


def _scores(scores: list[float], decoding: Decoding) -> dict:
    """{"rouge_l"} of one greedy score; {"rouge_l", "rouge_l_std", "rouge_l_samples"} of sampled draws."""
    if not decoding.sampled:
        return {"rouge_l": scores[0]}
    return {"rouge_l": float(np.mean(scores)), "rouge_l_std": float(np.std(scores, ddof=1)) if len(scores) > 1
            else 0.0, "rouge_l_samples": scores}
