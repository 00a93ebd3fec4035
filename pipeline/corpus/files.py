"""Corpus files: `--data DOMAIN=PATH` specs, `--mixture` YAML files, and the files a spec names (a file, a directory
or a glob), each with its format (by suffix, or a `datasets` save_to_disk directory)."""

import glob
import os
import re
from dataclasses import dataclass

import yaml

from cache_format import KdcacheError
from cache_format.schema import is_domain_name

_FORMATS = {".jsonl": "json", ".json": "json", ".txt": "text", ".parquet": "parquet"}
SUPPORTED_SUFFIXES = tuple(s + c for s in _FORMATS for c in ("", ".gz", ".zst") if s != ".parquet" or not c)
_SUPPORTED = ", ".join(SUPPORTED_SUFFIXES) + " or a datasets save_to_disk directory"
_GLOB_CHARS = re.compile(r"[*?[]")


@dataclass(frozen=True)
class DataSpec:
    """One `--data DOMAIN=PATH`: PATH is a file, a directory or a glob."""

    domain: str
    path: str


def _check_domain(domain: str, where: str) -> str:
    if not is_domain_name(domain):
        raise KdcacheError(f"{where}: invalid domain name {domain!r} (use letters, digits, '_', '.', '-')")
    return domain


def parse_data_spec(s: str) -> DataSpec:
    """Parse `DOMAIN=PATH` (split at the first '=')."""
    domain, sep, path = s.partition("=")
    if not sep or not domain:
        raise KdcacheError(f"--data {s!r}: expected DOMAIN=PATH, e.g. code=data/code.jsonl")
    if not path:
        raise KdcacheError(f"--data {s!r}: empty PATH")
    return DataSpec(_check_domain(domain, f"--data {s!r}"), path)


def read_yaml(path: str) -> dict:
    """A YAML file's top-level mapping (`--config`, a mixture file); KdcacheError naming the file otherwise."""
    try:
        with open(path, encoding="utf-8") as f:
            doc = yaml.safe_load(f)
    except OSError as e:
        raise KdcacheError(f"cannot read {path}: {e.strerror or e}") from e
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise KdcacheError(f"{path}: invalid YAML: {' '.join(str(e).split())}") from e
    if not isinstance(doc, dict):
        raise KdcacheError(f"{path}: expected a mapping of names to values")
    return doc


def load_mixture(path: str, doc: dict | None = None) -> list[DataSpec]:
    """Data specs from a YAML file (or its already parsed mapping `doc`) with `data: {domain: path or [paths]}` or
    `data: [{domain:, path:}, ...]`.

    Relative paths are relative to the YAML file's directory. Other top-level keys are ignored.
    """
    doc = read_yaml(path) if doc is None else doc
    if "data" not in doc:
        raise KdcacheError(f"{path}: expected a mapping with a `data:` key")
    data = doc["data"]
    if isinstance(data, dict):
        items = list(data.items())
    elif isinstance(data, list) and all(isinstance(i, dict) and set(i) == {"domain", "path"} for i in data):
        items = [(i["domain"], i["path"]) for i in data]
    else:
        raise KdcacheError(f"{path}: `data` must map domain -> path(s) or be a list of {{domain:, path:}} items")
    if not items:
        raise KdcacheError(f"{path}: `data` is empty")
    base = os.path.dirname(path)
    specs = []
    for domain, paths in items:
        _check_domain(domain, path)
        paths = [paths] if isinstance(paths, str) else paths
        if not isinstance(paths, list) or not paths or not all(isinstance(p, str) and p for p in paths):
            raise KdcacheError(f"{path}: domain {domain!r}: path must be a non-empty string or list of strings")
        specs += [DataSpec(domain, os.path.join(base, os.path.expanduser(p))) for p in paths]
    return specs


def _format(path: str) -> str | None:
    """'json', 'text', 'parquet', 'dataset' (save_to_disk directory) or None (unsupported)."""
    if os.path.isdir(path):
        return "dataset" if _is_saved_dataset(path) else None
    name = path.lower()
    suffix = next((s for s in SUPPORTED_SUFFIXES if name.endswith(s)), None)
    return _FORMATS[suffix.removesuffix(".gz").removesuffix(".zst")] if suffix else None


def _is_saved_dataset(path: str) -> bool:
    return all(os.path.isfile(os.path.join(path, n)) for n in ("dataset_info.json", "state.json"))


def _walk(root: str) -> list[str]:
    """Supported files under root (recursively, hidden entries skipped); save_to_disk directories as one entry."""
    if _is_saved_dataset(root):
        return [root]
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        subdirs = [os.path.join(dirpath, d) for d in dirnames if not d.startswith(".")]
        found += [d for d in subdirs if _is_saved_dataset(d)]
        dirnames[:] = [os.path.basename(d) for d in subdirs if not _is_saved_dataset(d)]
        if "dataset_dict.json" in filenames:  # a DatasetDict.save_to_disk directory: only its split directories
            continue
        files = [os.path.join(dirpath, f) for f in filenames if not f.startswith(".")]
        found += [f for f in files if _format(f)]
    return found


def resolve_files(spec: DataSpec) -> list[str]:
    """The data files of a spec (a file, a directory searched recursively, or a glob), sorted.

    Unsupported files found in a directory or by a glob are skipped; one named directly is an error.
    """
    path = spec.path
    if os.path.isfile(path):
        if not _format(path):
            raise KdcacheError(f"{path}: unsupported file type (domain {spec.domain!r}; supported: {_SUPPORTED})")
        return [path]
    if os.path.isdir(path):
        files = _walk(path)
    elif _GLOB_CHARS.search(path):
        matches = glob.glob(path, recursive=True)
        if not matches:
            raise KdcacheError(f"data path for domain {spec.domain!r}: no files match {path}")
        files = [f for m in matches for f in (_walk(m) if os.path.isdir(m) else [m] if _format(m) else [])]
    else:
        raise KdcacheError(f"data path for domain {spec.domain!r} does not exist: {path}")
    if not files:
        raise KdcacheError(f"{path}: no supported data files (domain {spec.domain!r}; supported: {_SUPPORTED})")
    return sorted(set(files))


