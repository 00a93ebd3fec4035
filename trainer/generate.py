"""`kdcache eval --generate N`: ROUGE-L of greedy replies against a chat cache's reference replies (AdaKD's measure).

A chat (or prompt-completion) cache supervises position t when token t+1 is a trained response token. Within one
document of a row (documents start where position_ids == 0), the last run [s, e) of supervised positions is the
document's last assistant reply:
    prompt     doc tokens [doc_start, s + 1)       everything the model saw before the reply
    reference  tokens [s + 1, e + 1)               the reply, normally ending with the end-of-turn token
The model answers each prompt greedily; replies and references are decoded without special tokens and scored with
rouge-score's ROUGE-L F1 (stemmed, in [0, 1]). A text document (trained from its first token: no prompt) has no
reply to answer: text domains are left out, and a split without any conversation is refused.
"""

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


@torch.no_grad()
def greedy_replies(model, prompts: list[list[int]], max_new_tokens: int, stop_ids, device=None,
                   batch_size: int = 8, vocab_size: int | None = None) -> list[list[int]]:
    """The model's greedy continuation of each prompt: at most max_new_tokens ids, cut before the first id in
    stop_ids (which is not returned). Deterministic. Batches are left-padded with an attention mask and decoded
    with the KV cache; a plain argmax loop, so no generation_config setting (repetition penalty, ...) applies.
    device: where the prompts go (None: the model's device). vocab_size: ids from here on (the extra rows of a
    padded embedding) are never chosen (None: any logit)."""
    stop_set = {int(i) for i in stop_ids}
    if not stop_set:
        raise ValueError("greedy_replies needs at least one stop id")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    stop = torch.tensor(sorted(stop_set), dtype=torch.long, device=device)
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
                ids = out.logits[:, -1, :vocab_size].argmax(-1, keepdim=True)        # (B, 1)
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
    """Where a greedy reply ends: the cache's, the tokenizer's and the model's generation_config EOS ids, plus each
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
                      batch_size: int = 8) -> dict:
    """{"domains": {D: {"rouge_l", "n", "examples": [{"prompt", "reference", "reply"}] (the first 3)}},
    "mean": {"rouge_l" (each domain counts once), "n" (summed)}} for the model's greedy replies to up to n last
    replies per domain of split; domains without one (text) are left out. KdcacheError when no domain has one."""
    domains = cache.domains(split)
    report: dict = {"domains": {}, "mean": {}}
    for domain in domains:
        pairs = last_replies(cache, split, domain, n)
        if not pairs:
            continue
        prompts, refs = [p for p, _ in pairs], [r for _, r in pairs]
        stops = reply_stop_ids(cache.manifest.tokenizer.eos_id, tokenizer, model, refs)
        replies = greedy_replies(model, prompts, max_new_tokens, stops, device, batch_size,
                                 vocab_size=cache.manifest.tokenizer.vocab_size)
        ref_text = tokenizer.batch_decode(refs, skip_special_tokens=True)
        reply_text = tokenizer.batch_decode(replies, skip_special_tokens=True)
        examples = [{"prompt": tokenizer.decode(p, skip_special_tokens=True), "reference": r, "reply": g}
                    for p, r, g in zip(prompts[:N_EXAMPLES], ref_text, reply_text)]
        report["domains"][domain] = {"rouge_l": rouge_l(reply_text, ref_text), "n": len(pairs),
                                     "examples": examples}
    if not report["domains"]:
        raise KdcacheError(f"{cache.root}: --generate needs conversations (a chat or prompt-completion domain: "
                           f"replies after a prompt), split {split!r} has none "
                           f"(domains: {', '.join(domains) or 'none'})")
    per = report["domains"].values()
    report["mean"] = {"rouge_l": float(np.mean([d["rouge_l"] for d in per])), "n": sum(d["n"] for d in per)}
    return report
