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

    from pipeline.corpus import DataSpec

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


# The teacher families of the engine test matrix at their real vocabulary sizes, with their head options: name ->
# (transformers config class, model class, vocabulary size, config options). Heads of 64 (vLLM's CPU attention takes
# 32, 64 or 128), no grouped-query attention (GPT-NeoX has none).
FAMILIES = {
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", 151_936, {"tie_word_embeddings": True}),
    "llama3": ("LlamaConfig", "LlamaForCausalLM", 128_256, {"tie_word_embeddings": False}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", 256_000,
               {"head_dim": 64, "final_logit_softcapping": 30.0, "attn_logit_softcapping": 50.0, "sliding_window": 32}),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", 262_144, {"head_dim": 64, "sliding_window": 32}),
    "granite": ("GraniteConfig", "GraniteForCausalLM", 49_155,
                {"logits_scaling": 8.0, "embedding_multiplier": 12.0, "residual_multiplier": 0.22,
                 "attention_multiplier": 0.125, "tie_word_embeddings": True}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", 200_064,
             {"tie_word_embeddings": True, "partial_rotary_factor": 0.75, "pad_token_id": 0}),
    "phi": ("PhiConfig", "PhiForCausalLM", 51_200, {"partial_rotary_factor": 0.5, "tie_word_embeddings": False}),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", 50_304, {"rotary_pct": 0.25, "tie_word_embeddings": False}),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", 151_936,
                  {"head_dim": 64, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 64,
                   "tie_word_embeddings": False}),
}


def build_family(out_dir: Path, family: str, tokenizer, seed: int = 0, logit_std: float = 6.0, hidden: int = 128,
                 layers: int = 2, vocab_size: int | None = None):
    """A tiny random teacher of FAMILIES[family] (heads of 64, float32; vocab_size: the family's unless given)
    saved with `tokenizer`. Its output
    projection is scaled so that the logits have about `logit_std` standard deviation before the family's own scale
    and soft-cap (real teachers' logits reach 20-30: a missing soft-cap or scale shows), and a bias, where the
    family has one, is drawn large enough to move the ranking."""
    import torch
    import transformers

    config_class, model_class, vocab, options = FAMILIES[family]
    vocab = vocab_size or vocab
    torch.manual_seed(seed)
    config = getattr(transformers, config_class)(
        **{"vocab_size": vocab, "hidden_size": hidden, "intermediate_size": 2 * hidden, "num_hidden_layers": layers,
           "num_attention_heads": hidden // 64, "num_key_value_heads": hidden // 64, "max_position_embeddings": 512,
           "bos_token_id": tokenizer.eos_token_id, "eos_token_id": tokenizer.eos_token_id, **options})
    model = getattr(transformers, model_class)(config).eval()
    head = model.get_output_embeddings()
    with torch.no_grad():
        head.weight.mul_(logit_std / head.weight.std() / hidden ** 0.5 / getattr(config, "logits_scaling", 1.0) ** -1)
        if getattr(head, "bias", None) is not None:
            head.bias.normal_(0.0, logit_std / 2)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return model
