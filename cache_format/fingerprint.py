"""Tokenizer identity by content: the token->id map, BPE merges and special-token ids, never the files' bytes."""

import hashlib
import json
import os
from pathlib import Path


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 hex of what decides the ids a tokenizer produces. Duck-typed on a transformers tokenizer, so this
    package needs no transformers import; the same tokenizer saved by another version or with another chat
    template has the same fingerprint."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    merges: list = []
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        model = json.loads(backend.to_str()).get("model", {})
        merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    special = sorted({int(i) for i in getattr(tokenizer, "all_special_ids", [])})
    named = {name: getattr(tokenizer, f"{name}_token_id", None) for name in ("bos", "eos", "unk", "pad")}
    payload = json.dumps({"vocab": vocab, "merges": merges, "special_ids": special, "named": named},
                         ensure_ascii=False, separators=(",", ":"))
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
