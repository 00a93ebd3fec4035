"""Test helpers: a tiny tokenizer and Llama models built locally, and synthetic caches written with cache_format."""

from pathlib import Path

import numpy as np

from cache_format import (DomainInfo, Manifest, ShardWriter, SplitRule, TeacherInfo, TokenizerInfo, TopkV1,
                          write_manifest)

WORDS = {
    "code": "def return if else for while import class self print x y i n len range list dict None True".split(),
    "prose": "the a of and to in was he she it that with his her they said on for at by from story".split(),
    "math": "0 1 2 3 4 5 6 7 8 9 + - * / = ( ) x y sum prime integer proof lemma".split(),
    "data": "{ } [ ] : , id name value true false null key 10 20 30 \" ' table row".split(),
}


def domain_texts(domain: str, n: int, seed: int = 0) -> list[str]:
    """n short documents of a toy domain, deterministic in (domain, seed)."""
    rng = np.random.default_rng([seed, sum(map(ord, domain))])
    words = WORDS[domain]
    return [" ".join(rng.choice(words, size=int(rng.integers(8, 40)))) for _ in range(n)]


def build_tokenizer(out_dir: Path, vocab_size: int = 384):
    """A byte-level BPE trained in-process on the toy domains, saved as a transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|eos|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    corpus = [t for d in WORDS for t in domain_texts(d, 200)]
    tok.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|eos|>", bos_token="<|eos|>")
    fast.save_pretrained(out_dir)
    return fast


def build_llama(out_dir: Path, vocab_size: int, hidden: int, layers: int, seed: int, eos_id: int = 0):
    """A tiny random Llama saved with save_pretrained (float32, seed-fixed). head_dim is 32: vLLM's CPU
    attention kernels support no smaller head."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=hidden * 2,
                         num_hidden_layers=layers, num_attention_heads=max(1, hidden // 32), num_key_value_heads=1,
                         max_position_embeddings=512, bos_token_id=eos_id, eos_token_id=eos_id,
                         tie_word_embeddings=False, torch_dtype="float32")
    model = LlamaForCausalLM(config)
    model.save_pretrained(out_dir)
    return model


def random_row(rng: np.random.Generator, row_index: int, domain: str, T: int, K: int, V: int) -> dict:
    """One row with a random full teacher distribution per position, stored as top-K + actual-token logprob."""
    input_ids = rng.integers(0, V, size=T).astype(np.int32)                     # (T,)
    logits = rng.normal(size=(T, V)) * 3
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))               # (T, V)
    topk_ids = np.argsort(-logp, axis=-1, kind="stable")[:, :K].astype(np.int32)  # (T, K)
    topk_logprobs = np.take_along_axis(logp, topk_ids, -1).astype(np.float32)   # (T, K)
    target = np.full(T, np.nan, np.float32)
    target[:-1] = logp[np.arange(T - 1), input_ids[1:]]
    topk_ids[-1], topk_logprobs[-1] = 0, -np.inf                                # last position: no distribution
    return {"row_index": row_index, "domain": domain, "input_ids": input_ids, "topk_ids": topk_ids,
            "topk_logprobs": topk_logprobs, "target_logprobs": target}


def write_synthetic_cache(cache_dir: Path, rows_per_domain: dict[str, int], T: int = 16, K: int = 8, V: int = 64,
                          seed: int = 0, rows_per_shard: int = 5, row_group_rows: int = 2) -> Manifest:
    """A complete cache of random rows (train split, plus a val split of 2 rows per domain)."""
    rng = np.random.default_rng(seed)
    codec = TopkV1(top_k=K)
    splits: dict[str, dict[str, DomainInfo]] = {}
    for split, counts in (("train", rows_per_domain), ("val", {d: 2 for d in rows_per_domain})):
        for domain, n in counts.items():
            shards = []
            for start in range(0, n, rows_per_shard):
                w = ShardWriter(cache_dir, f"{split}/{domain}/shard-{len(shards):05d}.parquet", codec, row_group_rows)
                for i in range(start, min(n, start + rows_per_shard)):
                    w.write(random_row(rng, i, domain, T, K, V))
                shards.append(w.close())
            splits.setdefault(split, {})[domain] = DomainInfo(
                rows=sum(s.rows for s in shards), tokens=sum(s.tokens for s in shards), shards=shards)
    manifest = Manifest(
        teacher=TeacherInfo(path="synthetic", name="synthetic", fingerprint="0" * 64, engine="synthetic",
                            engine_version="0", logprobs_mode="raw_logprobs", dtype="float32"),
        tokenizer=TokenizerInfo(vocab_size=V, fingerprint="0" * 64, eos_id=0), top_k=K, seq_len=T,
        codec=codec.params(), split=SplitRule(rule="synthetic", seed=seed, val_fraction=0.0), splits=splits)
    write_manifest(cache_dir, manifest)
    return manifest
