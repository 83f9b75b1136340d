"""The cache on disk: layout, shard names, manifest, cache.json and the errors.

A cache is a directory (full description with a plain-zarr/h5py/numpy reader in
docs/cache-format.md)::

    cache.json       metadata: settings the vectors depend on, then a ``summary``
    manifest.tsv     index, utt_id, speaker, path of every planned utterance
    shards/          shard-00000.zarr (zarr v3 group) or shard-00000.h5, ...
    locks/           rank-<r>.lock, one per-process lock per writing rank

Shard k covers manifest rows ``[k * shard_size, (k + 1) * shard_size)``. Each row ends up
either as a vector row of its shard (``index``) or in the shard's ``skipped`` map with its
reason, so no utterance disappears silently. A shard is written aside and renamed into
place, so a shard file that exists under its final name was complete when written; its
checksums and cache.json's ``manifest_sha256`` tell whether it still is.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path

from mrlcache import __version__
from mrlcache.cache.backends import BACKENDS

FORMAT_VERSION = 2
# Version 1: no checksums, no manifest_sha256, the backbone as packed strings.
READABLE_VERSIONS = (1, 2)
META_FILE = "cache.json"
MANIFEST_FILE = "manifest.tsv"
SKIPPED_FILE = "skipped.tsv"  # utt_id, reason, path of every utterance without vectors
SOURCES_FILE = "sources.tsv"  # extract's record of every audio file (mrlcache/extract/sources.py)
SHARDS_DIR = "shards"
LOCKS_DIR = "locks"
MANIFEST_HEADER = "index\tutt_id\tspeaker\tpath"
DTYPES = ("float16", "float32")
# Keys that may differ between the runs that fill one cache: everything else must match.
# (manifest_sha256 covers the paths, which may change when the data moves.)
VOLATILE_KEYS = ("summary", "mrlcache_version", "manifest_sha256")
REQUIRED_KEYS = ("pooled_dim", "views", "dtype", "shard_size")
# What a damaged shard's message ends with: the writer rewrites every damaged shard.
REPAIR = "rerun the same 'mrlcache extract' command to rewrite it"

SHARD_RE = re.compile(r"^shard-(\d{5,})(\.[A-Za-z0-9]+)$")
# Temporary shard names carry the writing rank, so a writer can tell a dead run's leftovers
# (rank lock free) from another live rank's shard in progress (rank lock held).
TMP_RE = re.compile(r"^\.shard-(\d{5,})\.tmp-r(\d+)-(\d+)$")


class CacheError(Exception):
    """Base class of every cache error."""


class NotACacheError(CacheError):
    """The path does not exist or is not an mrlcache cache."""


class FormatVersionError(CacheError):
    """The cache was written in a format version this mrlcache cannot read."""


class IncompleteCacheError(CacheError):
    """Some shards of the cache are missing (an extraction that did not finish)."""


class SettingsMismatchError(CacheError):
    """An existing cache was written with other settings than the ones given."""


class CacheLockedError(CacheError):
    """Another process is writing the same rank of the same cache."""


class DamagedCacheError(CacheError):
    """A shard or the manifest does not match what was written (the message names it and the fix)."""


def shard_name(k: int, backend: str) -> str:
    """File name of shard ``k``: ``shard-00003.zarr`` or ``shard-00003.h5``."""
    return f"shard-{k:05d}{BACKENDS[backend].suffix}"


def num_shards(num_utterances: int, shard_size: int) -> int:
    """Number of shards holding ``num_utterances`` manifest rows."""
    return math.ceil(num_utterances / shard_size)


def shard_rows(k: int, shard_size: int, num_utterances: int) -> range:
    """Manifest rows held by shard ``k``."""
    return range(k * shard_size, min((k + 1) * shard_size, num_utterances))


def settings(meta: dict) -> dict:
    """The keys of ``meta`` a resumed run must repeat exactly."""
    return {k: v for k, v in meta.items() if k not in VOLATILE_KEYS}


def jsonable(meta: dict) -> dict:
    """``meta`` as it reads back from JSON (tuples -> lists), so comparisons are fair."""
    try:
        return json.loads(json.dumps(meta, sort_keys=True))
    except TypeError as err:
        raise ValueError(f"cache metadata must be JSON-serialisable: {err}") from None


def meta_text(meta: dict) -> str:
    """cache.json's text for ``meta``."""
    return json.dumps(meta, indent=2, sort_keys=True) + "\n"


def shard_files(shards_dir: Path, backend: str) -> dict[int, Path]:
    """Shards present under their final names in ``shards_dir``: {k: path}."""
    found = {}
    if shards_dir.is_dir():
        suffix = BACKENDS[backend].suffix
        for entry in shards_dir.iterdir():
            m = SHARD_RE.match(entry.name)
            if m and m.group(2) == suffix:
                found[int(m.group(1))] = entry
    return found


# ---------------------------------------------------------------------------- manifest


def manifest_text(manifest) -> str:
    """TSV text of a manifest: Utterance-like objects with .utt_id, .speaker, .path."""
    lines = [MANIFEST_HEADER]
    for i, utt in enumerate(manifest):
        fields = (utt.utt_id, utt.speaker or "", str(utt.path))
        for field in fields:
            if "\t" in field or "\n" in field or "\r" in field:
                raise ValueError(
                    f"manifest row {i} ({utt.utt_id!r}): tabs and newlines cannot be stored "
                    f"in utterance ids, speakers or paths; rename the file"
                )
        lines.append(f"{i}\t{fields[0]}\t{fields[1]}\t{fields[2]}")
    return "\n".join(lines) + "\n"


def read_manifest(path) -> tuple[list[str], list[str], list[str]]:
    """Read ``manifest.tsv``; returns (utt_ids, speakers, paths) in manifest order.

    A missing speaker is stored and returned as "".
    """
    path = Path(path)
    with open(path) as f:
        header = f.readline().rstrip("\n")
        if header != MANIFEST_HEADER:
            raise CacheError(f"{path}: bad header {header!r}, expected {MANIFEST_HEADER!r}")
        utt_ids, speakers, paths = [], [], []
        for i, line in enumerate(f):
            fields = line.rstrip("\n").split("\t")
            if len(fields) != 4 or fields[0] != str(i):
                raise CacheError(f"{path}: line {i + 2} is not '{i}<TAB>utt_id<TAB>speaker<TAB>path'")
            utt_ids.append(fields[1])
            speakers.append(fields[2])
            paths.append(fields[3])
    return utt_ids, speakers, paths


def manifest_sha256(path) -> str:
    """SHA-256 of manifest.tsv's bytes (recorded in cache.json as ``manifest_sha256``)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def check_manifest(path: Path, meta: dict) -> str | None:
    """The problem of the manifest of the cache at ``path``, or None when it matches cache.json."""
    manifest = path / MANIFEST_FILE
    if not manifest.is_file():
        return f"{manifest}: missing; {REPAIR}"
    recorded = meta.get("manifest_sha256")
    if recorded is not None and manifest_sha256(manifest) != recorded:
        return (
            f"{manifest}: does not match the SHA-256 recorded in cache.json (edited or damaged: "
            f"ids or speakers may be swapped); {REPAIR}"
        )
    return None


# ---------------------------------------------------------------------------- metadata


def read_meta(path) -> dict:
    """Read and check ``cache.json`` of the cache directory ``path``."""
    path = Path(path)
    if not path.exists():
        raise NotACacheError(f"{path}: no such cache directory; run 'mrlcache extract --out {path}' first")
    meta_path = path / META_FILE
    if not path.is_dir() or not meta_path.is_file():
        raise NotACacheError(
            f"{path}: not an mrlcache cache (no {META_FILE}); give the --out directory of 'mrlcache extract'"
        )
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise NotACacheError(
            f"{meta_path}: unreadable ({err}); rerun 'mrlcache extract' with --overwrite"
        ) from None
    version = meta.get("format_version") if isinstance(meta, dict) else None
    if version is None:
        raise NotACacheError(f"{meta_path}: no format_version; not an mrlcache cache")
    if version not in READABLE_VERSIONS:
        raise FormatVersionError(
            f"{path}: cache format_version {version} is not supported by mrlcache {__version__} "
            f"(reads versions {', '.join(map(str, READABLE_VERSIONS))}); re-extract the cache or use "
            f"a matching mrlcache"
        )
    if meta.get("format") not in BACKENDS:
        raise CacheError(f"{meta_path}: unknown format {meta.get('format')!r}; known: {', '.join(BACKENDS)}")
    missing = [k for k in (*REQUIRED_KEYS, "num_utterances") if not isinstance(meta.get(k), (int, str))]
    if missing:
        raise NotACacheError(f"{meta_path}: lacks {', '.join(missing)}; rerun 'mrlcache extract' with --overwrite")
    return meta
