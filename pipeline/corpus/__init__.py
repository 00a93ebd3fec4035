"""Corpus ingestion and packing for `kdcache capture`: domain-tagged files → documents → train/val rows of tokens.

files.py resolves `--data` specs and `--mixture` files to files and formats, records.py streams each file's
documents (text, conversations, prompt–completion pairs), packing.py splits, tokenises and packs them into rows.
Files are streamed one at a time, never the whole corpus in memory.
"""

from .files import SUPPORTED_SUFFIXES, DataSpec, load_mixture, parse_data_spec, read_yaml, resolve_files
from .packing import Row, iter_split_rows, split_of, tokenize_documents
from .records import Conversation, CorpusStats, Reading, holds_conversations, record_key

__all__ = ["SUPPORTED_SUFFIXES", "Conversation", "CorpusStats", "DataSpec", "Reading", "Row", "holds_conversations",
           "iter_split_rows", "load_mixture", "parse_data_spec", "read_yaml", "record_key",
           "resolve_files", "split_of", "tokenize_documents"]
