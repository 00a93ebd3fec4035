"""Tokenizer identity by content: the token->id map, BPE merges and special-token ids, never the files' bytes."""

import hashlib
import json
import os
from pathlib import Path


NAMED_TOKENS = ("bos", "eos", "unk", "pad")


def named_ids(tokenizer) -> dict:
    """A transformers tokenizer's bos/eos/unk/pad ids (None: unset)."""
    return {name: getattr(tokenizer, f"{name}_token_id", None) for name in NAMED_TOKENS}


def tokenizer_json(tokenizer) -> str | None:
    """A fast tokenizer's tokenizer.json text (`backend_tokenizer.to_str()`); None for a tokenizer without one."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return backend.to_str() if backend is not None else None


def bpe_merges(text: str | None) -> list[str]:
    """The BPE merges of a tokenizer.json text as "a b" strings ([] for other models, or no text)."""
    model = json.loads(text).get("model", {}) if text is not None else {}
    return [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 hex of what decides the ids a tokenizer produces. Duck-typed on a transformers tokenizer, so this
    package needs no transformers import; the same tokenizer saved by another version or with another chat
    template has the same fingerprint."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    special = sorted({int(i) for i in getattr(tokenizer, "all_special_ids", [])})
    payload = json.dumps({"vocab": vocab, "merges": bpe_merges(tokenizer_json(tokenizer)), "special_ids": special,
                          "named": named_ids(tokenizer)}, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def files_fingerprint(paths: list, sample: int = 1 << 20) -> str:
    """sha256 over each file's base name, size and first and last `sample` bytes: cheap on 100 GB of weights or
    corpus, and changes when a file is replaced, grown or truncated."""
    h = hashlib.sha256()
    for path in paths:
        size = os.path.getsize(path)
        h.update(f"{os.path.basename(path)}:{size}".encode())
        with open(path, "rb") as f:
            h.update(f.read(sample))
            f.seek(max(0, size - sample))
            h.update(f.read(sample))
    return h.hexdigest()


def weights_fingerprint(model_dir: str | os.PathLike) -> str:
    """files_fingerprint of a model directory's config.json and every weight file (names, sizes, first and last MiB)."""
    root = Path(model_dir)
    weights = sorted(p for p in root.iterdir() if p.suffix in {".safetensors", ".bin", ".pt", ".pth", ".gguf"})
    return files_fingerprint([root / "config.json", *weights])
