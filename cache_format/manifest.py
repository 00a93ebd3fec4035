"""The manifest: the contract between stages. Written last and atomically; a cache without it is incomplete."""

import json
import os
from dataclasses import asdict, dataclass, field

import pyarrow.fs as pafs

from . import storage
from .errors import CacheError
from .fingerprint import named_ids, tokenizer_fingerprint, tokenizer_json
from .token_bytes import probe_kind
from .schema import FORMAT_NAME, FORMAT_VERSION, PACKINGS, SHARD_NAME, SPLITS, is_domain_name

MANIFEST_NAME = "manifest.json"
CONFIG_NAME = "capture_config.json"      # beside the manifest: the capture's resolved options
TOKENIZER_NAME = "tokenizer.json"        # beside the manifest: the teacher tokenizer (its fast serialisation)


@dataclass(frozen=True)
class ShardInfo:
    path: str     # relative to the cache dir, e.g. "train/code/shard-00000.parquet"
    rows: int     # packed sequences
    tokens: int   # input tokens (sum of row lengths)
    bytes: int    # file size on disk
    sha256: str   # hex digest of the file's bytes
    supervised: int | None = None   # positions with a teacher distribution; None (older caches): tokens - rows

    def __post_init__(self):
        if self.supervised is None:
            object.__setattr__(self, "supervised", self.tokens - self.rows)


@dataclass(frozen=True)
class DomainInfo:
    rows: int
    tokens: int
    shards: list[ShardInfo]
    supervised_tokens: int | None = None   # positions with a teacher distribution; None: the shards' sum

    def __post_init__(self):
        if self.supervised_tokens is None:
            object.__setattr__(self, "supervised_tokens", sum(s.supervised for s in self.shards))


@dataclass(frozen=True)
class TeacherInfo:
    path: str                 # where the weights were loaded from
    name: str                 # human name (config's _name_or_path or the directory name)
    fingerprint: str          # sha256 over the weight files' names, sizes and first/last MiB
    engine: str               # "vllm" | "hf"
    engine_version: str
    logprobs_mode: str        # "raw_logprobs": log_softmax of the raw logits at temperature 1
    dtype: str
    output: str = ""          # vLLM: "hidden" (final hidden states, head applied by kdcache) or "logprobs"


@dataclass(frozen=True)
class TokenizerInfo:
    vocab_size: int           # len(tokenizer): the ids the tokenizer can produce
    fingerprint: str          # sha256 of its token->id map, merges and special-token ids
    eos_id: int
    file_sha256: str = ""     # sha256 of the cache's tokenizer.json; "" (older caches, slow tokenizers): no file
    named_ids: dict = field(default_factory=dict)   # {"bos", "eos", "unk", "pad"}: id or None; {} in older caches
    token_bytes: str = ""     # token_bytes.KINDS: every id stands for fixed bytes (text spans); "": not recorded

    @classmethod
    def of(cls, tokenizer, cache_dir: str | os.PathLike) -> "TokenizerInfo":
        """The info of a transformers tokenizer (duck-typed), file_sha256 that of the tokenizer.json in cache_dir
        (write_tokenizer; "" if there is none). The file is hashed, not the tokenizer serialised again: a call with
        truncation or padding options changes what it serialises to."""
        fs, path = storage.resolve(storage.join(str(cache_dir), TOKENIZER_NAME))
        return cls(vocab_size=len(tokenizer), fingerprint=tokenizer_fingerprint(tokenizer),
                   eos_id=int(tokenizer.eos_token_id),
                   file_sha256=storage.sha256(fs, path) if storage.size(fs, path) is not None else "",
                   named_ids=named_ids(tokenizer), token_bytes=probe_kind(tokenizer, tokenizer_json(tokenizer)))


@dataclass(frozen=True)
class SplitRule:
    rule: str                 # how a document is assigned, in words (docs/cache_format.md)
    seed: int
    val_fraction: float


@dataclass(frozen=True)
class Manifest:
    teacher: TeacherInfo
    tokenizer: TokenizerInfo
    top_k: int
    seq_len: int
    codec: dict               # codec name + parameters (schema.codec_from_params)
    split: SplitRule
    splits: dict[str, dict[str, DomainInfo]]   # split -> domain -> counts and shards
    capture_config: dict = field(default_factory=dict)
    created_by: str = ""
    packing: str = "concat"   # PACKINGS: "isolated" rows carry doc_lengths (documents restart at position 0)
    format: str = FORMAT_NAME
    format_version: int = FORMAT_VERSION

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict, where: str = MANIFEST_NAME) -> "Manifest":
        if not isinstance(d, dict):
            raise CacheError(f"{where}: expected a JSON object")
        if d.get("format") != FORMAT_NAME:
            raise CacheError(f"{where}: field 'format' is {d.get('format')!r}, expected {FORMAT_NAME!r}")
        version = d.get("format_version")
        if version != FORMAT_VERSION:
            raise CacheError(f"{where}: format_version {version!r} is not supported "
                             f"(this kdcache reads format_version {FORMAT_VERSION})")
        try:
            splits = {
                split: {dom: DomainInfo(rows=info["rows"], tokens=info["tokens"],
                                        shards=[ShardInfo(**s) for s in info["shards"]],
                                        supervised_tokens=info.get("supervised_tokens"))
                        for dom, info in domains.items()}
                for split, domains in d["splits"].items()
            }
            m = cls(teacher=TeacherInfo(**d["teacher"]), tokenizer=TokenizerInfo(**d["tokenizer"]),
                    top_k=int(d["top_k"]), seq_len=int(d["seq_len"]), codec=dict(d["codec"]),
                    split=SplitRule(**d["split"]), splits=splits, capture_config=d.get("capture_config", {}),
                    created_by=d.get("created_by", ""), packing=d.get("packing", "concat"), format=d["format"],
                    format_version=version)
        except KeyError as e:
            raise CacheError(f"{where}: missing field {e.args[0]!r}") from None
        except (TypeError, AttributeError, ValueError) as e:
            raise CacheError(f"{where}: malformed field ({e})") from None
        unknown = set(m.splits) - set(SPLITS)
        if unknown:
            raise CacheError(f"{where}: unknown split {sorted(unknown)[0]!r} (expected {', '.join(SPLITS)})")
        for split, domains in m.splits.items():         # every path stays inside the cache: {split}/{domain}/shard-N
            for domain, info in domains.items():
                if not is_domain_name(domain):
                    raise CacheError(f"{where}: splits.{split}: domain name {domain!r} is not a plain name "
                                     "(letters, digits, '_', '.', '-')")
                for i, shard in enumerate(info.shards):
                    folder, _, name = shard.path.rpartition("/") if isinstance(shard.path, str) else ("", "", "")
                    if folder != f"{split}/{domain}" or not SHARD_NAME.fullmatch(name):
                        raise CacheError(f"{where}: splits.{split}.{domain}.shards[{i}].path {shard.path!r} is not "
                                         f"{split}/{domain}/shard-NNNNN.parquet (a shard must lie inside its cache)")
        if m.packing not in PACKINGS:
            raise CacheError(f"{where}: packing {m.packing!r} is not one of {', '.join(PACKINGS)}")
        if m.top_k <= 0 or m.seq_len < 2:
            raise CacheError(f"{where}: top_k={m.top_k}, seq_len={m.seq_len} out of range")
        return m

    def shards(self) -> list[ShardInfo]:
        return [s for domains in self.splits.values() for info in domains.values() for s in info.shards]

    def summary(self) -> dict:
        """What `kdcache inspect` shows: teacher, tokenizer, codec, k, seq_len, packing, and per split and domain
        rows, tokens, supervised tokens (those with a teacher distribution), shards, bytes and bytes/token, with
        their totals."""
        per_token = lambda b, t: round(b / t, 2) if t else 0.0  # noqa: E731
        splits = {split: {name: {"rows": d.rows, "tokens": d.tokens, "supervised_tokens": d.supervised_tokens,
                                 "shards": len(d.shards), "bytes": sum(s.bytes for s in d.shards),
                                 "bytes_per_token": per_token(sum(s.bytes for s in d.shards), d.tokens)}
                          for name, d in sorted(domains.items())}
                  for split, domains in sorted(self.splits.items())}
        total = {key: sum(d[key] for ds in splits.values() for d in ds.values())
                 for key in ("rows", "tokens", "supervised_tokens", "bytes")}
        d = self.to_dict()
        return {"format_version": self.format_version, "codec": self.codec, "teacher": d["teacher"],
                "tokenizer": d["tokenizer"], "top_k": self.top_k, "seq_len": self.seq_len, "packing": self.packing,
                "split": d["split"],
                "splits": splits, "total": {**total, "bytes_per_token": per_token(total["bytes"], total["tokens"])}}


def write_manifest(cache_dir: str | os.PathLike, manifest: Manifest) -> str:
    """Write manifest.json atomically (local: tmp + fsync + rename; object store: one upload): the cache's commit
    point, so write it after every shard. cache_dir: a path or URL (storage.py). Returns where it was written."""
    path = storage.join(str(cache_dir), MANIFEST_NAME)
    storage.write_json(path, manifest.to_dict())
    return path


def write_tokenizer(cache_dir: str | os.PathLike, tokenizer) -> None:
    """Write the teacher tokenizer as tokenizer.json at the cache root (atomically; a path or URL), so that a
    student's tokenizer can be compared with it token by token where the teacher is not; nothing for a tokenizer
    with no fast serialisation (TokenizerInfo.of then records no file)."""
    text = tokenizer_json(tokenizer)
    if text is not None:
        fs, path = storage.resolve(storage.join(str(cache_dir), TOKENIZER_NAME))
        storage.write_bytes(fs, path, text.encode())


def read_manifest(cache_dir: str | os.PathLike) -> Manifest:
    """The manifest of a finished cache (a path or URL); CacheError naming what is missing or malformed."""
    fs, base = storage.resolve(cache_dir)
    kind = fs.get_file_info(base).type
    if kind == pafs.FileType.NotFound:
        raise CacheError(f"{cache_dir}: no such cache directory")
    if kind != pafs.FileType.Directory:
        raise CacheError(f"{cache_dir}: not a directory")
    path = storage.join(str(cache_dir), MANIFEST_NAME)
    if storage.size(fs, storage.join(base, MANIFEST_NAME)) is None:
        raise CacheError(f"{cache_dir}: no {MANIFEST_NAME} (not a cache, or a capture that has not finished)")
    try:
        d = json.loads(storage.read_bytes(fs, storage.join(base, MANIFEST_NAME)))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CacheError(f"{path}: malformed JSON ({e})") from None
    return Manifest.from_dict(d, where=path)
