"""Errors a user can act on. The CLI prints them as one `Error: ...` line and exits 1."""


class KdcacheError(Exception):
    """Base class for every error kdcache reports to the user (bad input, bad cache, bad config)."""


class CacheError(KdcacheError):
    """The cache on disk is missing, incomplete, corrupt or of an unknown format."""
