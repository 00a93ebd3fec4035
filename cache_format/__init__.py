"""The kdcache on-disk contract: schema, codec, manifest, writer, reader, verify, publishing a finished cache.

Depends on pyarrow, numpy and the standard library only (never torch or vllm), so any tool can read a cache.
"""

from .errors import CacheError, KdcacheError
from .fingerprint import files_fingerprint, tokenizer_fingerprint, weights_fingerprint
from .manifest import (CONFIG_NAME, MANIFEST_NAME, TOKENIZER_NAME, DomainInfo, Manifest, ShardInfo, SplitRule,
                       TeacherInfo, TokenizerInfo, read_manifest, write_manifest, write_tokenizer)
from .publish import commit_cache, publish
from .reader import Cache, open_cache
from .schema import FORMAT_VERSION, PACKINGS, SPLITS, TopkV1, TopkV2, TopkV3, codec_from_params
from .verify import VerifyReport, verify_cache
from .writer import ShardWriter, file_sha256

__all__ = [
    "CONFIG_NAME", "Cache", "CacheError", "DomainInfo", "FORMAT_VERSION", "KdcacheError", "MANIFEST_NAME", "Manifest",
    "PACKINGS", "SPLITS", "ShardInfo", "ShardWriter", "SplitRule", "TOKENIZER_NAME", "TeacherInfo", "TokenizerInfo",
    "TopkV1", "TopkV2", "TopkV3", "VerifyReport", "codec_from_params", "commit_cache", "file_sha256",
    "files_fingerprint", "open_cache", "publish", "read_manifest", "tokenizer_fingerprint", "verify_cache",
    "weights_fingerprint", "write_manifest", "write_tokenizer",
]
