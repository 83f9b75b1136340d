"""What makes a shard trustworthy: its structure and rows (always checked), its checksums
(checked on demand), and the summary numbers computed from the shards.

The writer stores ``sha256 = {"pooled": ..., "index": ...}`` in each shard's attributes:
SHA-256 of the little-endian, C-order bytes of the arrays as stored. Opening a cache runs
:func:`inspect_shard` on every shard (reads metadata and the index only); ``verify=True``
adds :func:`checksum_problems` (reads every vector).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from mrlcache.cache import layout
from mrlcache.cache.format import REPAIR, SHARDS_DIR, DamagedCacheError, settings, shard_files, shard_rows

ATTR_KEYS = ("shard", "rows", "n_ok", "n_skipped", "seconds", "skipped")


def cache_binding(meta: dict) -> str:
    """The ``cache`` attribute of a shard: SHA-256 of the settings and the manifest's SHA-256.

    A shard copied from another cache with the same shard size and shape (other
    utterances, or other weights, seed, views...) has sound checksums; only this tells.
    Both parts are fixed for the life of a cache (the stored manifest keeps its paths).
    """
    text = json.dumps({"settings": settings(meta), "manifest_sha256": meta.get("manifest_sha256")}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def array_sha256(array: np.ndarray) -> str:
    """SHA-256 of an array's little-endian C-order bytes (independent of the file format)."""
    array = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
    return hashlib.sha256(array.view(np.uint8).reshape(-1)).hexdigest()


def checksums(pooled: np.ndarray | None, index: np.ndarray, arrays: dict | None = None) -> dict:
    """The ``sha256`` attribute of a shard: {"pooled": hex, "index": hex, <array>: hex...}.

    ``pooled`` None: a cache without pooled; ``arrays``: the other streams' stored arrays.
    """
    found = {} if pooled is None else {"pooled": array_sha256(pooled)}
    found["index"] = array_sha256(np.asarray(index, dtype=np.int64))
    for name, array in (arrays or {}).items():
        found[name] = array_sha256(array)
    return found


def stream_arrays(backend, path, meta: dict, n: int) -> tuple[dict, list[str]]:
    """{array: (shape, dtype, chunks)} the shard's non-pooled streams must have, and problems
    found on the way (a ragged stream's offsets are read: (n + 1,) int64, small)."""
    views, expected, problems = int(meta["views"]), {}, []
    for name, info in layout.cache_streams(meta).items():
        if name == "pooled":
            continue
        dtype = np.dtype(info["dtype"])
        if not info["ragged"]:
            item = layout.item_shape(info)
            expected[name] = ((n, views, *item), dtype, layout.dense_chunks(n, views, item, dtype.itemsize))
            continue
        offsets_name = name + layout.OFFSETS
        bad = backend.check_array(path, offsets_name, (n + 1,), np.int64, (n + 1,))
        if bad:
            problems += bad
            continue
        offsets = backend.read_array(path, offsets_name)
        if offsets[0] != 0 or (np.diff(offsets) < 0).any():
            problems.append(f"{offsets_name} does not start at 0 and increase")
            continue
        shape = tuple(int(s) for s in info["shape"])
        total = int(offsets[-1])
        expected[name] = ((*shape, total), dtype, layout.ragged_chunks(shape, total, dtype.itemsize))
    return expected, problems


def damaged(path: Path, problems: list[str]) -> DamagedCacheError:
    """The error for a damaged shard: one line naming the shard, what is wrong, and the fix."""
    return DamagedCacheError(f"{path}: damaged shard ({'; '.join(problems)}); {REPAIR}")


def inspect_shard(backend, path: Path, k: int, meta: dict, row_of: dict) -> tuple[dict, np.ndarray, tuple]:
    """Check the structure of shard ``k`` at ``path``; return (attrs, index (n,), shape (n, V, D)).

    Checks what costs no vector reads: the file opens, its numbers are those of shard k,
    the pooled shape matches cache.json, every chunk is present with its full size, and the
    index plus the skipped ids cover the shard's manifest rows exactly once.

    Args:
        row_of: {utt_id: manifest row} of the cache's manifest.

    Raises:
        DamagedCacheError: naming the shard, its problems and the fix.
    """
    try:
        attrs, index, shape = backend.read_meta(path)
    except Exception as err:  # any library error means the same: the file is not readable
        raise damaged(path, [f"unreadable: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"]) from None
    required = ATTR_KEYS + (("sha256",) if meta.get("format_version", 1) >= 2 else ())
    lacking = [key for key in required if key not in attrs]
    if lacking:
        raise damaged(path, [f"attributes {', '.join(lacking)} missing"])
    rows = shard_rows(k, int(meta["shard_size"]), int(meta["num_utterances"]))
    views, dim = int(meta["views"]), int(meta["pooled_dim"])
    has_pooled = "pooled" in layout.cache_streams(meta)
    problems = []
    if attrs["shard"] != k or list(attrs["rows"]) != [rows.start, rows.stop]:
        problems.append(f"it says shard {attrs['shard']} rows {attrs['rows']}, expected shard {k} rows {[rows.start, rows.stop]}")
    if attrs["n_ok"] != len(index) or (has_pooled and (shape is None or tuple(shape) != (len(index), views, dim))):
        problems.append(f"pooled shape {shape} with {len(index)} index rows, expected (n, {views}, {dim}) with n = {attrs['n_ok']}")
    # Shards written before the binding existed lack it; those are checked as before.
    if "cache" in attrs and attrs["cache"] != cache_binding(meta):
        problems.append("written for another cache (other utterances or settings)")
    if problems:
        raise damaged(path, problems)
    if not has_pooled:
        shape = (len(index), views, 0)
    try:
        problems = backend.check(path, tuple(shape), np.dtype(meta["dtype"])) if has_pooled else []
        expected, found = stream_arrays(backend, path, meta, len(index))
        problems += found
        for name, (array_shape, dtype, chunks) in expected.items():
            problems += backend.check_array(path, name, array_shape, dtype, chunks)
    except Exception as err:
        problems = [f"unreadable: {type(err).__name__}: {err}"]
    if problems:
        raise damaged(path, problems)
    skipped = attrs["skipped"]
    if not isinstance(skipped, dict) or attrs["n_skipped"] != len(skipped):
        raise damaged(path, ["skipped map does not match n_skipped"])
    outside = [u for u in skipped if row_of.get(u) not in rows]
    if outside:
        raise damaged(path, [f"skipped ids not in the shard's manifest rows: {outside[:3]}"])
    covered = np.concatenate([index, np.array([row_of[u] for u in skipped], dtype=np.int64)])
    if not np.array_equal(np.sort(covered), np.arange(rows.start, rows.stop)):
        bad = [int(i) for i in index if not rows.start <= i < rows.stop][:3]
        what = f"index values outside rows {rows.start}..{rows.stop - 1}: {bad}" if bad else "index has duplicate rows"
        raise damaged(path, [f"{what} (index and skipped must cover the rows exactly once)"])
    return attrs, index, tuple(shape)


def checksum_problems(backend, path: Path, attrs: dict, index: np.ndarray, shape: tuple, dtype) -> list[str]:
    """Recompute the shard's checksums (reads every vector); the mismatches, if any.

    A format-1 shard has no checksums: nothing to compare, no problem.
    """
    recorded = attrs.get("sha256")
    if recorded is None:
        return []
    try:
        pooled = None
        if "pooled" in recorded:
            pooled = np.empty(shape, dtype=dtype)
            backend.read_pooled(path, pooled)
        arrays = {name: backend.read_array(path, name) for name in recorded if name not in ("pooled", "index")}
    except Exception as err:
        return [f"vectors unreadable: {type(err).__name__}: {err}"]
    found = checksums(pooled, index, arrays)
    return [f"{name} checksum mismatch (bytes changed since written)" for name in found if found[name] != recorded.get(name)]


def totals(out: Path, shards: dict[int, dict], meta: dict | None = None, backend=None) -> dict:
    """Summary numbers computed from the shards' attributes ({k: attrs}), in shard order.

    A cache whose ``meta`` lists ``streams`` also gets ``stream_bytes`` {stream: bytes on
    disk} (a ragged stream counts its offsets), read from the shards through ``backend``.
    An eval cache with a window gets ``windowed_files`` {utt_id: windows} (empty when no
    utterance was long enough).
    """
    n_ok = n_skipped = 0
    seconds = 0.0
    by_reason: dict[str, int] = {}
    skipped_files: dict[str, str] = {}
    windowed: dict[str, int] = {}
    for k in sorted(shards):
        attrs = shards[k]
        n_ok += attrs["n_ok"]
        n_skipped += attrs["n_skipped"]
        seconds += attrs["seconds"]
        for utt, reason in sorted(attrs["skipped"].items()):
            by_reason[reason] = by_reason.get(reason, 0) + 1
            skipped_files[utt] = reason
        windowed.update(attrs.get("windowed") or {})
    size = sum(p.stat().st_size for p in (out / SHARDS_DIR).rglob("*") if p.is_file())
    found = {
        "utterances": n_ok,
        "skipped": n_skipped,
        "skipped_by_reason": dict(sorted(by_reason.items())),
        "skipped_files": skipped_files,  # utt_id -> reason; also CACHE/skipped.tsv
        "audio_hours": seconds / 3600.0,
        "shards": len(shards),
        "cache_bytes": size,
    }
    if windowed or (meta or {}).get("window_seconds") is not None:
        found["windowed_files"] = windowed  # utt_id -> windows (eval caches with --window-seconds)
    if meta is not None and isinstance(meta.get("streams"), dict):
        files = shard_files(out / SHARDS_DIR, meta["format"])
        stream_bytes = {}
        for name, info in meta["streams"].items():
            arrays = [name, name + layout.OFFSETS] if info["ragged"] else [name]
            stream_bytes[name] = sum(backend.array_bytes(files[k], a) for k in sorted(shards) for a in arrays)
        found["stream_bytes"] = stream_bytes
    return found


def stale_keys(summary: dict, computed: dict) -> list[str]:
    """Keys of ``computed`` totals that ``summary`` gets wrong (floats to 1e-9 relative)."""
    wrong = []
    for key, value in computed.items():
        have = summary.get(key)
        if isinstance(value, float) and isinstance(have, (int, float)):
            if abs(have - value) > 1e-9 * max(1.0, abs(value)):
                wrong.append(key)
        elif have != value:
            wrong.append(key)
    return wrong
