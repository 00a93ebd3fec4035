"""Toy domains, a tiny tokenizer and tiny Llama models built locally from configs (no downloads).

Used by the benchmarks and the tests. Deterministic in their seeds.
"""

from pathlib import Path

import numpy as np

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


def write_toy_corpus(out_dir: Path, docs_per_domain: int, seed: int = 0) -> list:
    """OUT_DIR/{domain}.jsonl for every toy domain; the DataSpecs that capture takes."""
    import json

    from .corpus import DataSpec

    specs = []
    for domain in WORDS:
        path = Path(out_dir) / f"{domain}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps({"text": t}) + "\n" for t in domain_texts(domain, docs_per_domain, seed)))
        specs.append(DataSpec(domain, str(path)))
    return specs


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
