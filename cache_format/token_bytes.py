"""The bytes each token id stands for: how a cache's teacher ids give back the text the teacher read.

A cache stores the teacher's token ids and its tokenizer.json. For a tokenizer whose every id stands for fixed bytes,
the concatenated bytes of a row's ids are the text the teacher read (after its normaliser), and each token's text
span is its place in that concatenation: nothing more needs storing per token. Two kinds do:
    byte-level   byte-level BPE (GPT-2, Llama 3, Qwen, Phi, OLMo, ...): each character of a token is one byte
    metaspace    SentencePiece-style (Llama 2, Mistral, Gemma, ...): "▁" is a space, "<0xNN>" (byte fallback) the byte
Added tokens stand for their content (a plain one of a metaspace tokenizer with "▁" read as a space, as its decoder
does: Gemma 3's whitespace-run tokens "▁▁", "▁▁▁", ...). Capture records the kind in the manifest
(`tokenizer.token_bytes`) once the tokenizer has given back a probe text byte for byte (`byte_exact_table`); caches
without it cannot teach a student with another tokenizer (trainer/cross_tokenizer.py).
"""

import json
import re
from dataclasses import dataclass

import numpy as np

KINDS = ("byte-level", "metaspace")
# a probe that a byte-exact tokenizer gives back: multi-byte characters, digits, tabs, CRLF, runs of spaces
PROBE = "Hello, world! naïve café — 日本語 😀 x=12+345;\n\tdef f():  return [1, 2]\r\n  end."
_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _byte_level_chars() -> dict[str, int]:
    """GPT-2's byte <-> printable character table, as character -> byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def _decoder_types(decoder: dict | None) -> list[dict]:
    if not decoder:
        return []
    return [d for part in decoder.get("decoders", []) for d in _decoder_types(part)] if decoder.get("type") == \
        "Sequence" else [decoder]


def kind_of(spec: dict) -> str:
    """The token-bytes kind of a parsed tokenizer.json ("" when its ids do not stand for fixed bytes)."""
    decoders = _decoder_types(spec.get("decoder"))
    types = {d.get("type") for d in decoders}
    if "ByteLevel" in types:
        return "byte-level"
    if "Metaspace" in types or any(d.get("type") == "Replace" and d.get("pattern", {}).get("String") == "▁"
                                   for d in decoders):
        return "metaspace"
    return ""


@dataclass(frozen=True)
class TokenBytes:
    """The bytes of every id of one tokenizer."""
    kind: str
    pieces: list                  # id -> bytes, or None (no such id, or the unknown token: no fixed bytes)
    lengths: np.ndarray           # (V,) int64 len(pieces[id]); -1 where None
    special: np.ndarray           # (V,) bool: an added special token (bos, eos, chat markers, ...)
    fallback: np.ndarray          # (V,) bool: a byte-fallback token "<0xNN>"

    def join(self, ids) -> bytes | None:
        """The bytes of a sequence of ids; None if one has no fixed bytes."""
        parts = [self.pieces[i] if 0 <= i < len(self.pieces) else None for i in ids]
        return None if any(p is None for p in parts) else b"".join(parts)


def token_bytes(text: str) -> TokenBytes:
    """The TokenBytes of a tokenizer.json text; ValueError if its kind is not one of KINDS."""
    spec = json.loads(text)
    kind = kind_of(spec)
    if not kind:
        raise ValueError(f"decoder {json.dumps(spec.get('decoder'))[:120]} is neither byte-level nor metaspace")
    model = spec.get("model", {})
    vocab = model.get("vocab", {})
    entries = list(vocab.items()) if isinstance(vocab, dict) else [(piece, i) for i, (piece, _) in enumerate(vocab)]
    added = {t["id"]: t for t in spec.get("added_tokens", [])}
    size = max([*(i for _, i in entries), *added, -1]) + 1
    unk = model.get("unk_token")
    if isinstance(unk, int):                                     # Unigram: unk_id
        unk = vocab[unk][0] if not isinstance(vocab, dict) else None
    pieces, fallback = [None] * size, np.zeros(size, bool)
    chars = _byte_level_chars()
    for piece, i in entries:
        if piece == unk:
            continue
        if kind == "byte-level":
            try:
                pieces[i] = bytes(chars[c] for c in piece)
            except KeyError:                                     # not a byte-level piece: its own text
                pieces[i] = piece.encode("utf-8")
        elif (m := _BYTE_FALLBACK.fullmatch(piece)) and model.get("byte_fallback"):
            pieces[i], fallback[i] = bytes([int(m.group(1), 16)]), True
        else:
            pieces[i] = piece.replace("▁", " ").encode("utf-8")
    special = np.zeros(size, bool)
    for i, t in added.items():                                   # its content; the decoder reads "▁" in a plain
        text = t["content"]                                      # added token as a space (Gemma's "▁▁", "▁▁▁", ...)
        if kind == "metaspace" and not t.get("special"):
            text = text.replace("▁", " ")
        pieces[i] = text.encode("utf-8") if t["content"] != unk else None
        special[i] = bool(t.get("special"))
    lengths = np.array([len(p) if p is not None else -1 for p in pieces], np.int64)
    return TokenBytes(kind, pieces, lengths, special, fallback)


def byte_exact_table(tokenizer, text: str | None) -> TokenBytes | None:
    """The tokenizer's TokenBytes if its ids give back PROBE byte for byte (a leading space that a metaspace
    tokenizer adds is allowed), else None. tokenizer: a transformers tokenizer (duck-typed); text: its
    tokenizer.json (None: no table)."""
    try:
        table = token_bytes(text) if text is not None else None
    except ValueError:
        return None
    if table is None or table.join(tokenizer(PROBE, add_special_tokens=False)["input_ids"]) not in \
            (PROBE.encode(), b" " + PROBE.encode()):
        return None
    return table


def probe_kind(tokenizer, text: str | None) -> str:
    """The tokenizer's kind if byte_exact_table finds its ids byte-exact, else ""."""
    table = byte_exact_table(tokenizer, text)
    return table.kind if table is not None else ""
