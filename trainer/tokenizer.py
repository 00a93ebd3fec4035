"""Loading a tokenizer that tokenizes exactly as its own tokenizer.json does.

transformers may rebuild a tokenizer from its vocabulary and merges instead of reading its tokenizer.json, and the
rebuilt one can differ: transformers 5 builds DeepSeek-V3's byte-level BPE (declared `LlamaTokenizerFast`) with a
Metaspace pre-tokenizer, so every space disappears ("Hello, world" -> "Hello" "," "world"), and it adds
`<|endoftext|>` to a word-level tokenizer declared `Qwen2Tokenizer`. A cache or a student built on such a tokenizer
would train on a tokenization the model never saw. `load_tokenizer` checks what transformers loads against
`tokenizers.Tokenizer.from_file(tokenizer.json)` on a probe (mixed text and the special tokens); where they differ
it uses tokenizer.json's own tokenizer (`PreTrainedTokenizerFast`, with tokenizer_config.json's special tokens and
chat template) with one warning naming the cause, and refuses with one line if that does not agree either.
"""

import logging
from pathlib import Path

from cache_format import KdcacheError
from cache_format.token_bytes import PROBE

log = logging.getLogger("kdcache")


def _probe(reference) -> str:
    """PROBE, then the tokenizer's special tokens (at most 32), each between spaces and text."""
    specials = [t.content for t in reference.get_added_tokens_decoder().values() if t.special][:32]
    return " ".join([PROBE, *(f"{s} after" for s in specials)])


def disagreement(tokenizer, reference) -> str | None:
    """How a transformers tokenizer differs from a `tokenizers.Tokenizer` on the probe, or None if it does not:
    its size with added tokens, then the ids of the probe (no special tokens added)."""
    if len(tokenizer) != reference.get_vocab_size(with_added_tokens=True):
        return f"{len(tokenizer)} tokens vs {reference.get_vocab_size(with_added_tokens=True)} in tokenizer.json"
    text = _probe(reference)
    ours = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    theirs = reference.encode(text, add_special_tokens=False).ids
    if ours == theirs:
        return None
    i = next((j for j, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
    lo = max(0, i - 2)
    return (f"{reference.decode(theirs[lo:i + 3])!r} -> {[reference.id_to_token(t) for t in ours[lo:i + 3]]} vs "
            f"{[reference.id_to_token(t) for t in theirs[lo:i + 3]]} in tokenizer.json")


def load_tokenizer(path, where: str):
    """The transformers tokenizer of a model or tokenizer directory, checked against its tokenizer.json (module
    doc). where: how messages name it ("--teacher PATH"). KdcacheError (one line) if it cannot be loaded or cannot
    be made to agree with its tokenizer.json; a directory without tokenizer.json is loaded as it is."""
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as e:  # noqa: BLE001  transformers raises OSError / ValueError / TypeError by what is missing
        raise KdcacheError(f"{where}: cannot load its tokenizer ({type(e).__name__}: "
                           f"{str(e).splitlines()[0] if str(e) else ''})") from None
    file = Path(path) / "tokenizer.json"
    if not file.is_file():
        return tokenizer
    try:
        reference = Tokenizer.from_file(str(file))
    except Exception as e:  # noqa: BLE001  the Rust parser raises plain Exceptions
        raise KdcacheError(f"{where}: {file} cannot be read by tokenizers ({' '.join(str(e).split())})") from None
    cause = disagreement(tokenizer, reference)
    if cause is None:
        return tokenizer
    published = PreTrainedTokenizerFast.from_pretrained(path)
    still = disagreement(published, reference)
    if still is not None:
        raise KdcacheError(f"{where}: the tokenizer transformers loads ({type(tokenizer).__name__}) does not tokenize "
                           f"as its tokenizer.json ({cause}), nor does tokenizer.json with its tokenizer_config.json "
                           f"({still})")
    import transformers
    log.warning("%s: transformers %s loads its tokenizer as %s, which tokenizes differently from its tokenizer.json "
                "(%s); kdcache uses tokenizer.json as published", where, transformers.__version__,
                type(tokenizer).__name__, cause)
    return published
