"""kd-topk-cache: the on-disk contract between teacher caching (writer) and student training (reader).

See cache_schema/README.md for the format specification.
"""

from cache_schema.cache_state import peek_cache_state, read_part_commit
from cache_schema.cache_stats import cache_stats
from cache_schema.cache_validation import validate_cache
from cache_schema.encoding import ENCODINGS, encoding_meta
from cache_schema.fingerprints import file_fingerprint, json_fingerprint, samples_fingerprint, tokenizer_fingerprint
from cache_schema.format import (
    FORMAT_NAME,
    FORMAT_VERSION,
    CacheError,
    CacheFormatError,
    CacheMismatchError,
    CacheValidationError,
    IncompleteCacheError,
)
from cache_schema.integrity import CacheDamagedError
from cache_schema.lock import CacheLockedError
from cache_schema.overwrite import check_overwritable
from cache_schema.reader import KDCache, open_cache
from cache_schema.sampled import TARGET_MODES, targets_meta
from cache_schema.writer import CacheWriter, identity_differences, write_part

__all__ = [
    "ENCODINGS",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "TARGET_MODES",
    "CacheDamagedError",
    "CacheError",
    "CacheFormatError",
    "CacheLockedError",
    "CacheMismatchError",
    "CacheValidationError",
    "CacheWriter",
    "IncompleteCacheError",
    "KDCache",
    "cache_stats",
    "check_overwritable",
    "encoding_meta",
    "file_fingerprint",
    "identity_differences",
    "json_fingerprint",
    "open_cache",
    "peek_cache_state",
    "read_part_commit",
    "samples_fingerprint",
    "targets_meta",
    "tokenizer_fingerprint",
    "validate_cache",
    "write_part",
]
