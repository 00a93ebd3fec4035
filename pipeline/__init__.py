"""kdcache stages: the click CLI, corpus ingestion, teacher engines, capture and profile."""

__version__ = "0.1.0"
