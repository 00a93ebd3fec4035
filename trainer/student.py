"""Loading a student model and checking that it can learn from (or be evaluated on) a cache.

The student must share the teacher's tokenizer: same vocabulary, merges and special-token ids (compared by
`tokenizer_fingerprint`, never by file bytes). Its output embedding may be padded beyond the tokenizer's vocabulary
(e.g. 152064 rows for a 151936-token tokenizer); callers keep all its logits.
"""

from pathlib import Path

import torch

from cache_format import KdcacheError, Manifest, tokenizer_fingerprint, weights_fingerprint


def resolve_device(device=None) -> torch.device:
    """The given device, or cuda when available, else cpu."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device)


def _resolve_dtype(dtype, device: torch.device):
    """None: the checkpoint's own dtype on GPU, float32 on CPU; "auto" or a name such as "bfloat16"; a torch.dtype."""
    if dtype is None:
        return "auto" if device.type == "cuda" else torch.float32
    if isinstance(dtype, str) and dtype != "auto":
        resolved = getattr(torch, dtype, None)
        if not isinstance(resolved, torch.dtype):
            raise KdcacheError(f"unknown dtype {dtype!r} (expected auto, float32, bfloat16 or float16)")
        return resolved
    return dtype


def output_rows(model) -> int:
    """Rows of the model's output embedding (its logit count, padding included)."""
    head = model.get_output_embeddings()
    return int(head.weight.shape[0]) if head is not None else int(model.config.vocab_size)


def check_student_tokenizer(tokenizer, manifest: Manifest, where: str = "student") -> None:
    """KdcacheError unless the tokenizer is the cache's teacher tokenizer (by content fingerprint)."""
    info = manifest.tokenizer
    if tokenizer_fingerprint(tokenizer) != info.fingerprint:
        raise KdcacheError(f"{where}: the student's tokenizer differs from the cache's teacher tokenizer "
                           f"(student vocab {len(tokenizer)}, teacher vocab {info.vocab_size}); "
                           f"a student must use the teacher's tokenizer")


def check_student_vocab(model, manifest: Manifest, where: str = "student") -> None:
    """KdcacheError if the model has fewer output rows than the cache's tokenizer has tokens (more is fine)."""
    rows, vocab = output_rows(model), manifest.tokenizer.vocab_size
    if rows < vocab:
        raise KdcacheError(f"{where}: the student's output embedding has {rows} rows, fewer than the cache's "
                           f"tokenizer vocabulary of {vocab}")


def load_student(path: str, manifest: Manifest, device=None, dtype=None):
    """(model, tokenizer) from an HF model directory, checked against the cache's manifest; model in eval mode.

    device: None = cuda if available else cpu. dtype: None = checkpoint dtype on GPU / float32 on CPU, "auto",
    a name ("bfloat16") or a torch.dtype. Raises KdcacheError (one line naming the path) for a missing path, a
    directory that is not a model, a missing tokenizer, a foreign tokenizer, or too few output rows.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = Path(path)
    if not p.exists():
        raise KdcacheError(f"{path}: student model path does not exist")
    if not p.is_dir() or not (p / "config.json").is_file():
        raise KdcacheError(f"{path}: not a model directory (no config.json)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(p)
    except Exception as e:  # transformers raises OSError / ValueError / TypeError depending on what is missing
        raise KdcacheError(f"{path}: no usable tokenizer in the student directory "
                           f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    check_student_tokenizer(tokenizer, manifest, str(path))
    dev = resolve_device(device)
    try:
        model = AutoModelForCausalLM.from_pretrained(p, dtype=_resolve_dtype(dtype, dev))
    except KdcacheError:
        raise
    except Exception as e:
        raise KdcacheError(f"{path}: cannot load the student model "
                           f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    check_student_vocab(model, manifest, str(path))
    return model.to(dev).eval(), tokenizer


def student_fingerprint(path) -> str:
    """files_fingerprint of the student's config.json and weight files; KdcacheError if they cannot be read."""
    try:
        return weights_fingerprint(str(path))
    except OSError as e:
        raise KdcacheError(f"{path}: cannot fingerprint the student's weights ({e.strerror}: {e.filename})") from None
