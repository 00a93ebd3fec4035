"""Loading a student model and checking that it can learn from (or be evaluated on) a cache.

The student must share the teacher's tokenizer: same vocabulary, merges and special-token ids (compared by
`tokenizer_fingerprint`, never by file bytes), or extend it: the teacher's token at every teacher id, the same BPE
merges and the teacher's bos/eos/unk/pad ids, plus tokens of its own after them (`add_tokens`, a new pad token),
which the teacher never predicts. Telling the two apart needs the teacher's vocabulary: the cache's tokenizer.json,
or for a cache written before caches carried it, the tokenizer in the teacher's directory if it is still there.
The student's output embedding may be padded beyond its tokenizer's vocabulary (e.g. 152064 rows for a
151936-token tokenizer); callers keep all its logits.
"""

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from cache_format import Cache, KdcacheError, Manifest, tokenizer_fingerprint, weights_fingerprint
from cache_format.fingerprint import NAMED_TOKENS, bpe_merges, named_ids, tokenizer_json

from .tokenizer import load_tokenizer

log = logging.getLogger("kdcache")


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


def max_positions(model) -> int:
    """The longest sequence the model's config takes (max_position_embeddings; unbounded when it names none)."""
    return getattr(model.config, "max_position_embeddings", None) or 1 << 30


def output_rows(model) -> int:
    """Rows of the model's output embedding (its logit count, padding included)."""
    head = model.get_output_embeddings()
    return int(head.weight.shape[0]) if head is not None else int(model.config.vocab_size)


@dataclass(frozen=True)
class Vocabulary:
    """What decides the meaning of a tokenizer's ids: tokens[i] is the token string of id i (None: no such id),
    merges its BPE merges as "a b" strings ([] for other models), named its bos/eos/unk/pad ids (None: unset)."""
    tokens: list
    merges: list
    named: dict


def _id_list(vocab: dict) -> list:
    tokens = [None] * (max(vocab.values(), default=-1) + 1)
    for token, i in vocab.items():
        tokens[i] = token
    return tokens


def vocabulary(tokenizer) -> Vocabulary:
    """The Vocabulary of a transformers tokenizer (added tokens included)."""
    return Vocabulary(tokens=_id_list(tokenizer.get_vocab()), merges=bpe_merges(tokenizer_json(tokenizer)),
                      named=named_ids(tokenizer))


def vocabulary_from_json(text: str, named: dict) -> Vocabulary:
    """The Vocabulary of a tokenizer.json (`tokenizers.Tokenizer.from_str`); named: its bos/eos/unk/pad ids, which
    the file does not hold (the manifest records them)."""
    from tokenizers import Tokenizer

    return Vocabulary(tokens=_id_list(Tokenizer.from_str(text).get_vocab(with_added_tokens=True)),
                      merges=bpe_merges(text), named=dict(named))


def compare_vocabularies(teacher: Vocabulary, student: Vocabulary) -> str | int:
    """How the student's ids relate to the teacher's: the number of ids the student has beyond the teacher's (0:
    the same ids) when it has the teacher's token at every teacher id, the same merges and the teacher's named ids
    (those the teacher sets); else the first difference, in words."""
    n = len(teacher.tokens)
    if student.tokens[:n] != teacher.tokens:
        for i, t in enumerate(teacher.tokens):
            s = student.tokens[i] if i < len(student.tokens) else None
            if s != t:
                break
        theirs = f"student {s!r}" if s is not None else f"the student has no id {i}"
        if i >= len(student.tokens):
            theirs = f"the student's vocabulary ends at id {len(student.tokens) - 1}"
        return f"at id {i}: teacher {t!r}, {theirs}" if t is not None else \
            f"at id {i}: the teacher has no token there, student {s!r}"
    if student.merges != teacher.merges:
        for j in range(max(len(teacher.merges), len(student.merges))):
            t = teacher.merges[j] if j < len(teacher.merges) else None
            s = student.merges[j] if j < len(student.merges) else None
            if s != t:
                break
        sides = [f"{who} {m!r}" if m is not None else f"{who} none (it has {len(all_)} merges)"
                 for who, m, all_ in (("teacher", t, teacher.merges), ("student", s, student.merges))]
        return f"in its BPE merges at merge {j}: {sides[0]}, {sides[1]}"
    for name in NAMED_TOKENS:
        t = teacher.named.get(name)
        if t is not None and student.named.get(name) != t:
            return f"in its {name} id: teacher {t}, student {student.named.get(name)}"
    return sum(token is not None for token in student.tokens[n:])


def teacher_vocabulary(cache: Cache | Manifest) -> Vocabulary | None:
    """The cache's teacher vocabulary: from its tokenizer.json (checked against the manifest: CacheError if missing
    or altered); for a cache without one, from the teacher directory's tokenizer if it is still there with the
    manifest's fingerprint; else None."""
    manifest = cache.manifest if isinstance(cache, Cache) else cache
    info = manifest.tokenizer
    text = cache.tokenizer_json() if isinstance(cache, Cache) else None
    if text is not None:
        return vocabulary_from_json(text, info.named_ids or {"eos": info.eos_id})
    if not Path(manifest.teacher.path).is_dir():
        return None
    try:
        tokenizer = load_tokenizer(manifest.teacher.path, f"teacher {manifest.teacher.path}")
    except KdcacheError:  # no usable tokenizer there any more: as if the directory were gone
        return None
    return vocabulary(tokenizer) if tokenizer_fingerprint(tokenizer) == info.fingerprint else None


def check_student_tokenizer(tokenizer, cache: Cache | Manifest, where: str = "") -> int:
    """KdcacheError unless the tokenizer is the cache's teacher tokenizer (by content fingerprint) or extends it
    (module doc: one warning names the ids the teacher never predicts). Returns the number of those ids (0: the
    teacher's ids). cache: the Cache (its tokenizer.json is read), or only its manifest (then the teacher
    directory's tokenizer is the reference). where: the student's path, for messages."""
    manifest = cache.manifest if isinstance(cache, Cache) else cache
    info = manifest.tokenizer
    if tokenizer_fingerprint(tokenizer) == info.fingerprint:
        return 0
    teacher = teacher_vocabulary(cache)
    if teacher is None:
        raise KdcacheError(f"{where or 'student'}: the student's tokenizer differs from the cache's teacher tokenizer "
                           f"(student vocab {len(tokenizer)}, teacher vocab {info.vocab_size}); "
                           f"a student must use the teacher's tokenizer")
    who, student = f"student {where}" if where else "student", vocabulary(tokenizer)
    result = compare_vocabularies(teacher, student)
    last = len(teacher.tokens) - 1
    if isinstance(result, str):
        raise KdcacheError(f"{who}: its tokenizer differs from the cache's teacher tokenizer {result} (a student "
                           f"must use the teacher's tokenizer, or extend it with tokens after id {last}, or train "
                           f"with --cross-tokenizer)")
    if result:
        log.warning("%s: its tokenizer extends the teacher's with %d tokens (ids %d..%d) that the teacher never "
                    "predicts; the student learns to give them no mass", who, result, last + 1,
                    len(student.tokens) - 1)
    return result


def check_student_vocab(model, manifest: Manifest, where: str = "student", tokenizer_size: int = 0) -> None:
    """KdcacheError if the model has fewer output rows than the cache's tokenizer has tokens, or than the student's
    own tokenizer (tokenizer_size: len(tokenizer), larger when it extends the teacher's); more is fine."""
    rows, vocab = output_rows(model), manifest.tokenizer.vocab_size
    if rows < max(vocab, tokenizer_size):
        theirs = f" and than its tokenizer's {tokenizer_size} tokens" if tokenizer_size > vocab else ""
        raise KdcacheError(f"{where}: the student's output embedding has {rows} rows, fewer than the cache's "
                           f"tokenizer vocabulary of {vocab}{theirs}")


def load_student(path: str, cache: Cache | Manifest, device=None, dtype=None, cross_tokenizer: bool = False):
    """(model, tokenizer) from an HF model directory, checked against the cache; model in eval mode.

    cache: the Cache, or only its manifest (a student whose tokenizer extends the teacher's is then recognised
    only while the teacher's directory holds its tokenizer: check_student_tokenizer). device: None = cuda if
    available else cpu. dtype: None = checkpoint dtype on GPU / float32 on CPU, "auto", a name ("bfloat16") or a
    torch.dtype. Raises KdcacheError (one line naming the path) for a missing path, a directory that is not a
    model, a missing tokenizer, a foreign tokenizer (one extending the teacher's is accepted with a warning), or
    too few output rows (fewer than the cache's vocabulary or than the student's own tokenizer). cross_tokenizer:
    any tokenizer is taken (trainer/cross_tokenizer.py aligns it with the teacher's); the output rows must cover
    the student's own tokenizer only.
    """
    from transformers import AutoModelForCausalLM

    p = Path(path)
    if not p.exists():
        raise KdcacheError(f"{path}: student model path does not exist")
    if not p.is_dir() or not (p / "config.json").is_file():
        raise KdcacheError(f"{path}: not a model directory (no config.json)")
    tokenizer = load_tokenizer(p, str(path))
    manifest = cache.manifest if isinstance(cache, Cache) else cache
    if not cross_tokenizer:
        check_student_tokenizer(tokenizer, cache, str(path))
    dev = resolve_device(device)
    try:
        model = AutoModelForCausalLM.from_pretrained(p, dtype=_resolve_dtype(dtype, dev))
    except KdcacheError:
        raise
    except Exception as e:
        raise KdcacheError(f"{path}: cannot load the student model "
                           f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    if cross_tokenizer:
        if output_rows(model) < len(tokenizer):
            raise KdcacheError(f"{path}: the student's output embedding has {output_rows(model)} rows, fewer than its "
                               f"tokenizer's {len(tokenizer)} tokens")
    else:
        check_student_vocab(model, manifest, str(path), len(tokenizer))
    return model.to(dev).eval(), tokenizer


def student_fingerprint(path) -> str:
    """files_fingerprint of the student's config.json and weight files; KdcacheError if they cannot be read."""
    try:
        return weights_fingerprint(str(path))
    except OSError as e:
        raise KdcacheError(f"{path}: cannot fingerprint the student's weights ({e.strerror}: {e.filename})") from None
