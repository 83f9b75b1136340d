"""What makes a shard trustworthy: its structure and rows (always checked), its checksums
(checked on demand), and the summary numbers computed from the shards.

The writer stores ``sha256 = {<array>: ..., "index": ...}`` in each shard's attributes:
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


def checksums(index: np.ndarray, arrays: dict) -> dict:
    """The ``sha256`` attribute of a shard: {<array>: hex, ..., "index": hex} over the
    streams' stored ``arrays`` {name: array} and the index."""
    found = {name: array_sha256(array) for name, array in arrays.items()}
    found[layout.INDEX] = array_sha256(np.asarray(index, dtype=np.int64))
    return found


def stream_arrays(backend, path, meta: dict, n: int) -> tuple[dict, list[str]]:
    """{array: (shape, dtype, chunks)} the shard's streams and index must have, and problems
    found on the way (a ragged stream's offsets are read: (n + 1,) int64, small)."""
    views = int(meta["views"])
    expected, problems = {layout.INDEX: ((n,), np.dtype(np.int64), None)}, []
    for record in layout.cache_records(meta).values():
        arrays = layout.expected_arrays(record, n, views)
        if record.ragged:
            offsets_name = record.name + layout.OFFSETS
            bad = backend.check_array(path, offsets_name, *arrays[offsets_name])
            if bad:
                problems += bad
                continue
            offsets = backend.read_array(path, offsets_name)
            if offsets[0] != 0 or (np.diff(offsets) < 0).any():
                problems.append(f"{offsets_name} does not start at 0 and increase")
                continue
            arrays = layout.expected_arrays(record, n, views, offsets)
        expected.update(arrays)
    return expected, problems


def damaged(path: Path, problems: list[str]) -> DamagedCacheError:
    """The error for a damaged shard: one line naming the shard, what is wrong, and the fix."""
    return DamagedCacheError(f"{path}: damaged shard ({'; '.join(problems)}); {REPAIR}")


def inspect_shard(backend, path: Path, k: int, meta: dict, row_of: dict) -> tuple[dict, np.ndarray]:
    """Check the structure of shard ``k`` at ``path``; return (attrs, index (n,)).

    Checks what costs no vector reads: the file opens, its numbers are those of shard k,
    every stream's shape matches cache.json, every chunk is present with its full size, and the
    index plus the skipped ids cover the shard's manifest rows exactly once.

    Args:
        row_of: {utt_id: manifest row} of the cache's manifest.

    Raises:
        DamagedCacheError: naming the shard, its problems and the fix.
    """
    try:
        attrs, shapes = backend.read_meta(path)
        index = np.asarray(backend.read_array(path, layout.INDEX), dtype=np.int64) if layout.INDEX in shapes else None
    except Exception as err:  # any library error means the same: the file is not readable
        raise damaged(path, [f"unreadable: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"]) from None
    if index is None:
        raise damaged(path, [f"array {layout.INDEX} is missing"])
    required = ATTR_KEYS + (("sha256",) if meta.get("format_version", 1) >= 2 else ())
    lacking = [key for key in required if key not in attrs]
    if lacking:
        raise damaged(path, [f"attributes {', '.join(lacking)} missing"])
    rows = shard_rows(k, int(meta["shard_size"]), int(meta["num_utterances"]))
    views = int(meta["views"])
    problems = []
    if attrs["shard"] != k or list(attrs["rows"]) != [rows.start, rows.stop]:
        problems.append(f"it says shard {attrs['shard']} rows {attrs['rows']}, expected shard {k} rows {[rows.start, rows.stop]}")
    if attrs["n_ok"] != len(index):
        problems.append(f"{len(index)} index rows, expected n_ok = {attrs['n_ok']}")
    for record in layout.cache_records(meta).values():
        if not record.ragged and shapes.get(record.name) != (len(index), views, *record.item_shape):
            problems.append(f"{record.name} shape {shapes.get(record.name)} with {len(index)} index rows, "
                            f"expected (n, {views}, {', '.join(map(str, record.item_shape))}) with n = {attrs['n_ok']}")
    # Shards written before the binding existed lack it; those are checked as before.
    if "cache" in attrs and attrs["cache"] != cache_binding(meta):
        problems.append("written for another cache (other utterances or settings)")
    if problems:
        raise damaged(path, problems)
    try:
        expected, problems = stream_arrays(backend, path, meta, len(index))
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
    return attrs, index


def checksum_problems(backend, path: Path, attrs: dict, index: np.ndarray) -> list[str]:
    """Recompute the shard's checksums (reads every vector); the mismatches, if any.

    A format-1 shard has no checksums: nothing to compare, no problem.
    """
    recorded = attrs.get("sha256")
    if recorded is None:
        return []
    try:
        arrays = {name: backend.read_array(path, name) for name in recorded if name != layout.INDEX}
    except Exception as err:
        return [f"vectors unreadable: {type(err).__name__}: {err}"]
    found = checksums(index, arrays)
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
        for name, record in layout.cache_records(meta).items():
            arrays = [name, name + layout.OFFSETS] if record.ragged else [name]
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
