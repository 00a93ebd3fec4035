"""The manifest: the contract between stages. Written last and atomically; a cache without it is incomplete."""

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import CacheError
from .schema import FORMAT_NAME, FORMAT_VERSION, SPLITS

MANIFEST_NAME = "manifest.json"


@dataclass(frozen=True)
class ShardInfo:
    path: str     # relative to the cache dir, e.g. "train/code/shard-00000.parquet"
    rows: int     # packed sequences
    tokens: int   # input tokens (sum of row lengths)
    bytes: int    # file size on disk
    sha256: str   # hex digest of the file's bytes


@dataclass(frozen=True)
class DomainInfo:
    rows: int
    tokens: int
    shards: list[ShardInfo]


@dataclass(frozen=True)
class TeacherInfo:
    path: str                 # where the weights were loaded from
    name: str                 # human name (config's _name_or_path or the directory name)
    fingerprint: str          # sha256 over the weight files' names, sizes and first/last MiB
    engine: str               # "vllm" | "hf"
    engine_version: str
    logprobs_mode: str        # "raw_logprobs": log_softmax of the raw logits at temperature 1
    dtype: str


@dataclass(frozen=True)
class TokenizerInfo:
    vocab_size: int           # len(tokenizer): the ids the tokenizer can produce
    fingerprint: str          # sha256 of its token->id map, merges and special-token ids
    eos_id: int


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
                                        shards=[ShardInfo(**s) for s in info["shards"]])
                        for dom, info in domains.items()}
                for split, domains in d["splits"].items()
            }
            m = cls(teacher=TeacherInfo(**d["teacher"]), tokenizer=TokenizerInfo(**d["tokenizer"]),
                    top_k=int(d["top_k"]), seq_len=int(d["seq_len"]), codec=dict(d["codec"]),
                    split=SplitRule(**d["split"]), splits=splits, capture_config=d.get("capture_config", {}),
                    created_by=d.get("created_by", ""), format=d["format"], format_version=version)
        except KeyError as e:
            raise CacheError(f"{where}: missing field {e.args[0]!r}") from None
        except (TypeError, AttributeError, ValueError) as e:
            raise CacheError(f"{where}: malformed field ({e})") from None
        unknown = set(m.splits) - set(SPLITS)
        if unknown:
            raise CacheError(f"{where}: unknown split {sorted(unknown)[0]!r} (expected {', '.join(SPLITS)})")
        if m.top_k <= 0 or m.seq_len < 2:
            raise CacheError(f"{where}: top_k={m.top_k}, seq_len={m.seq_len} out of range")
        return m

    def shards(self) -> list[ShardInfo]:
        return [s for domains in self.splits.values() for info in domains.values() for s in info.shards]


def write_manifest(cache_dir: str | os.PathLike, manifest: Manifest) -> Path:
    """Write manifest.json atomically (tmp + fsync + rename): the cache's commit point."""
    cache_dir = Path(cache_dir)
    final = cache_dir / MANIFEST_NAME
    tmp = cache_dir / (MANIFEST_NAME + ".tmp")
    with open(tmp, "w") as f:
        json.dump(manifest.to_dict(), f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, final)
    return final


def read_manifest(cache_dir: str | os.PathLike) -> Manifest:
    cache_dir = Path(cache_dir)
    if not cache_dir.exists():
        raise CacheError(f"{cache_dir}: no such cache directory")
    if not cache_dir.is_dir():
        raise CacheError(f"{cache_dir}: not a directory")
    path = cache_dir / MANIFEST_NAME
    if not path.exists():
        raise CacheError(f"{cache_dir}: no {MANIFEST_NAME} (not a cache, or a capture that has not finished)")
    try:
        d = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CacheError(f"{path}: malformed JSON ({e})") from None
    return Manifest.from_dict(d, where=str(path))
