"""The cache on disk: layout, metadata, manifest, resume checks, rank locks and the reader.

A cache is a directory (full description with a plain-zarr/h5py/numpy reader in
docs/cache-format.md)::

    cache.json       metadata: settings the vectors depend on, then a ``summary``
    manifest.tsv     index, utt_id, speaker, path of every planned utterance
    shards/          shard-00000.zarr (zarr v3 group) or shard-00000.h5, ...
    locks/           rank-<r>.lock, one flock per writing rank

Shard k covers manifest rows ``[k * shard_size, (k + 1) * shard_size)``. Each row ends up
either as a vector row of its shard (``index``) or in the shard's ``skipped`` map with its
reason, so no utterance disappears silently. A shard is written aside and renamed into
place, so a shard file that exists under its final name is complete: resuming means
redoing the shards that are missing.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import re
import shutil
from pathlib import Path

import numpy as np

from mrlcache import __version__
from mrlcache.cache.hdf5_backend import HDF5Backend
from mrlcache.cache.zarr_backend import ZarrBackend

FORMAT_VERSION = 1
META_FILE = "cache.json"
MANIFEST_FILE = "manifest.tsv"
SHARDS_DIR = "shards"
LOCKS_DIR = "locks"
MANIFEST_HEADER = "index\tutt_id\tspeaker\tpath"
DTYPES = ("float16", "float32")
# Keys that may differ between the runs that fill one cache: everything else must match.
VOLATILE_KEYS = ("summary", "mrlcache_version")
REQUIRED_KEYS = ("pooled_dim", "views", "dtype", "shard_size")

# Backend name -> class with write / read_meta / read_pooled (one small class per format).
BACKENDS = {backend.name: backend for backend in (ZarrBackend, HDF5Backend)}

_SHARD_RE = re.compile(r"^shard-(\d{5,})(\.zarr|\.h5)$")
# Temporary shard names carry the writing rank, so a writer can tell a dead run's leftovers
# (rank lock free) from another live rank's shard in progress (rank lock held).
_TMP_RE = re.compile(r"^\.shard-(\d{5,})\.tmp-r(\d+)-(\d+)$")


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


def shard_name(k: int, backend: str) -> str:
    """File name of shard ``k``: ``shard-00003.zarr`` or ``shard-00003.h5``."""
    return f"shard-{k:05d}{BACKENDS[backend].suffix}"


def num_shards(num_utterances: int, shard_size: int) -> int:
    """Number of shards holding ``num_utterances`` manifest rows."""
    return math.ceil(num_utterances / shard_size)


def _settings(meta: dict) -> dict:
    return {k: v for k, v in meta.items() if k not in VOLATILE_KEYS}


def _jsonable(meta: dict) -> dict:
    """``meta`` as it reads back from JSON (tuples -> lists), so comparisons are fair."""
    try:
        return json.loads(json.dumps(meta, sort_keys=True))
    except TypeError as err:
        raise ValueError(f"cache metadata must be JSON-serialisable: {err}") from None


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_exclusive(path: Path, text: str) -> bool:
    """Create ``path`` with ``text`` only if it does not exist; return False if it did.

    Written aside then hard-linked, so a concurrent reader never sees a half-written file
    and of two ranks racing to create it, exactly one wins.
    """
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    finally:
        tmp.unlink()


def _fsync_tree(path: Path) -> None:
    """fsync every file under ``path`` (or ``path`` itself), so a rename publishes data."""
    paths = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)



# ---------------------------------------------------------------------------- manifest


def _manifest_text(manifest) -> str:
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
    except (OSError, json.JSONDecodeError) as err:
        raise NotACacheError(
            f"{meta_path}: unreadable ({err}); rerun 'mrlcache extract' with --overwrite"
        ) from None
    version = meta.get("format_version") if isinstance(meta, dict) else None
    if version is None:
        raise NotACacheError(f"{meta_path}: no format_version; not an mrlcache cache")
    if version != FORMAT_VERSION:
        raise FormatVersionError(
            f"{path}: cache format_version {version} is not supported by mrlcache {__version__} "
            f"(reads version {FORMAT_VERSION}); re-extract the cache or use a matching mrlcache"
        )
    if meta.get("format") not in BACKENDS:
        raise CacheError(f"{meta_path}: unknown format {meta.get('format')!r}; known: {', '.join(BACKENDS)}")
    return meta


def _shard_files(shards_dir: Path, backend: str) -> dict[int, Path]:
    """Complete shards present in ``shards_dir``: {k: path}."""
    found = {}
    if shards_dir.is_dir():
        suffix = BACKENDS[backend].suffix
        for entry in shards_dir.iterdir():
            m = _SHARD_RE.match(entry.name)
            if m and m.group(2) == suffix:
                found[int(m.group(1))] = entry
    return found


# ---------------------------------------------------------------------------- writer


class _RankLock:
    """An exclusive ``flock`` on ``locks/rank-<r>.lock``; the kernel drops it on any exit."""

    def __init__(self, path: Path):
        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def _lock_is_free(path: Path) -> bool:
    """True when nobody holds the rank lock at ``path`` (probes by taking and dropping it)."""
    try:
        _RankLock(path).release()
        return True
    except BlockingIOError:
        return False


class CacheWriter:
    """Creates or resumes a cache and writes its shards; one writer per rank.

    Args:
        out: cache directory (created if missing).
        meta: settings the vectors depend on (model_config, weights_sha256, pooled_dim,
            sample_rate, mode, crop_seconds, max_seconds, views, augment, seed, dtype,
            shard_size, ...); must hold ``pooled_dim``, ``views``, ``dtype`` and
            ``shard_size``. ``format_version``, ``mrlcache_version``, ``format`` and
            ``num_utterances`` are added here.
        manifest: planned utterances in shard order, objects with ``.utt_id``,
            ``.speaker`` (str or None) and ``.path``.
        backend: "zarr" or "hdf5".
        overwrite: delete an existing cache at ``out`` and start over (rank 0 only).
        rank: this process's rank; two live writers of one rank are refused.

    Raises:
        SettingsMismatchError: ``out`` holds a cache written with other settings.
        CacheLockedError: another process is writing this rank (or any rank, on overwrite).
        NotACacheError: ``out`` is a non-empty directory that is not a cache.
    """

    def __init__(
        self, out, meta: dict, manifest, *, backend: str = "zarr", overwrite: bool = False, rank: int = 0
    ):
        if backend not in BACKENDS:
            raise ValueError(f"unknown cache format {backend!r}; known: {', '.join(BACKENDS)}")
        missing = [k for k in REQUIRED_KEYS if k not in meta]
        if missing:
            raise ValueError(f"cache metadata lacks {', '.join(missing)}")
        if meta["dtype"] not in DTYPES:
            raise ValueError(f"cache dtype {meta['dtype']!r} not supported; use one of {', '.join(DTYPES)}")
        if int(meta["shard_size"]) < 1 or int(meta["views"]) < 1 or int(meta["pooled_dim"]) < 1:
            raise ValueError("shard_size, views and pooled_dim must be positive")
        self.out = Path(out)
        self.backend = BACKENDS[backend]
        self.rank = int(rank)
        manifest_text = _manifest_text(manifest)
        self._utt_ids = [u.utt_id for u in manifest]
        self._speakers = [u.speaker or "" for u in manifest]
        if len(set(self._utt_ids)) != len(self._utt_ids):
            raise ValueError("manifest has duplicate utterance ids")
        self._row_of = {u: i for i, u in enumerate(self._utt_ids)}
        self.meta = _jsonable(
            {
                **{k: v for k, v in meta.items() if k != "summary"},
                "format_version": FORMAT_VERSION,
                "mrlcache_version": __version__,
                "format": backend,
                "num_utterances": len(self._utt_ids),
            }
        )
        self.shard_size = int(self.meta["shard_size"])
        self.num_shards = num_shards(len(self._utt_ids), self.shard_size)
        self.shards_dir = self.out / SHARDS_DIR
        self.locks_dir = self.out / LOCKS_DIR

        is_cache = (self.out / META_FILE).exists() or (self.out / MANIFEST_FILE).exists()
        if self.out.exists() and not self.out.is_dir():
            raise NotACacheError(f"{self.out}: is a file, not a cache directory; choose another --out")
        # Entries another rank creates first, before manifest.tsv exists, are not foreign.
        foreign = []
        if self.out.exists() and not is_cache:
            foreign = [p for p in self.out.iterdir() if not _ours(p.name)]
        if foreign:
            raise NotACacheError(
                f"{self.out}: directory is not empty and is not an mrlcache cache (no {META_FILE}); "
                f"choose another --out or empty it"
            )
        if overwrite and is_cache:
            if self.rank != 0:
                raise ValueError("only rank 0 may overwrite a cache; other ranks must start after it")
            self._delete_cache()

        self.out.mkdir(parents=True, exist_ok=True)
        self.shards_dir.mkdir(exist_ok=True)
        self.locks_dir.mkdir(exist_ok=True)
        try:
            self._lock = _RankLock(self.locks_dir / f"rank-{self.rank}.lock")
        except BlockingIOError:
            raise CacheLockedError(
                f"{self.out}: another process is already writing rank {self.rank} of this cache "
                f"(lock {self.locks_dir / f'rank-{self.rank}.lock'}); wait for it or stop it"
            ) from None
        try:
            self._create_or_check(manifest_text)
            self._clean_leftovers()
        except BaseException:
            self.close()
            raise

    # -- setup

    def _delete_cache(self) -> None:
        """Remove the cache entries at ``out`` (only ours; other files stay)."""
        if self.locks_dir.is_dir():
            for lock in self.locks_dir.glob("rank-*.lock"):
                if not _lock_is_free(lock):
                    raise CacheLockedError(
                        f"{self.out}: cannot overwrite, a writer holds {lock}; stop it first"
                    )
        for name in (SHARDS_DIR, LOCKS_DIR):
            if (self.out / name).is_dir():
                shutil.rmtree(self.out / name)
        for name in (META_FILE, MANIFEST_FILE):
            (self.out / name).unlink(missing_ok=True)

    def _create_or_check(self, manifest_text: str) -> None:
        """Create manifest.tsv and cache.json, or check that the existing ones match ours."""
        manifest_path = self.out / MANIFEST_FILE
        if not _write_exclusive(manifest_path, manifest_text):
            # Ids and speakers decide the shards; the paths may differ (data moved to
            # another disk) and the stored manifest keeps the first run's paths.
            utt_ids, speakers, _ = read_manifest(manifest_path)
            if utt_ids != self._utt_ids or speakers != self._speakers:
                raise SettingsMismatchError(
                    f"{self.out}: the existing cache was extracted from another utterance list "
                    f"({manifest_path}: {len(utt_ids)} utterances, now {len(self._utt_ids)}; ids or "
                    f"speakers differ); use --overwrite to start over or another --out"
                )
        meta_text = json.dumps(self.meta, indent=2, sort_keys=True) + "\n"
        meta_path = self.out / META_FILE
        if _write_exclusive(meta_path, meta_text):
            _fsync_dir(self.out)
            return
        old = read_meta(self.out)
        new, have = _settings(self.meta), _settings(old)
        differ = sorted(k for k in set(new) | set(have) if new.get(k) != have.get(k))
        if differ:
            details = "; ".join(f"{k}: cache has {have.get(k)!r}, now {new.get(k)!r}" for k in differ[:5])
            raise SettingsMismatchError(
                f"{self.out}: the existing cache was written with other settings "
                f"({', '.join(differ)}) - {details}; use --overwrite to start over or another --out"
            )

    def _clean_leftovers(self) -> None:
        """Delete temporary shards of dead writers (their rank lock is free)."""
        for entry in self.shards_dir.iterdir():
            m = _TMP_RE.match(entry.name)
            if not m:
                continue
            rank = int(m.group(2))
            if rank == self.rank or _lock_is_free(self.locks_dir / f"rank-{rank}.lock"):
                _remove(entry)

    # -- writing

    def shard_rows(self, k: int) -> range:
        """Manifest rows held by shard ``k``."""
        if not 0 <= k < self.num_shards:
            raise IndexError(f"shard {k} out of range (cache has {self.num_shards} shards)")
        return range(k * self.shard_size, min((k + 1) * self.shard_size, len(self._utt_ids)))

    def done_shards(self) -> set[int]:
        """Indices of the shards already complete on disk (by any rank, any earlier run)."""
        return {k for k in _shard_files(self.shards_dir, self.backend.name) if k < self.num_shards}

    def write_shard(self, k: int, index, pooled, skipped: dict, seconds: float) -> None:
        """Write shard ``k`` atomically: aside, flushed, then renamed into place.

        Args:
            k: shard number.
            index: (n_ok,) manifest rows of the vectors, all inside ``shard_rows(k)``.
            pooled: (n_ok, V, D) float array; stored as ``meta["dtype"]``.
            skipped: {utt_id: reason} of the shard's utterances without vectors; together
                with ``index`` it must cover every row of the shard exactly once.
            seconds: audio seconds decoded for the shard (for the summary).
        """
        rows = self.shard_rows(k)
        index = np.asarray(index, dtype=np.int64).reshape(-1)  # (n_ok,)
        views, dim = int(self.meta["views"]), int(self.meta["pooled_dim"])
        pooled = np.asarray(pooled)
        if pooled.shape != (len(index), views, dim):
            expected = (len(index), views, dim)
            raise ValueError(f"shard {k}: pooled has shape {pooled.shape}, expected {expected}")
        skipped = {str(u): str(r) for u, r in skipped.items()}
        unknown = [u for u in skipped if self._row_of.get(u) not in rows]
        if unknown:
            raise ValueError(f"shard {k}: skipped ids not in this shard's manifest rows: {unknown[:3]}")
        covered = np.concatenate([index, np.array([self._row_of[u] for u in skipped], dtype=np.int64)])
        exact = np.array_equal(np.sort(covered), np.arange(rows.start, rows.stop))
        if not exact:
            raise ValueError(
                f"shard {k}: index ({len(index)}) and skipped ({len(skipped)}) must cover manifest rows "
                f"{rows.start}..{rows.stop - 1} exactly once"
            )
        with np.errstate(over="ignore"):  # overflow to inf is caught just below
            stored = pooled.astype(self.meta["dtype"], copy=False)
        bad = ~np.isfinite(stored).all(axis=(1, 2))
        if bad.any():
            first = self._utt_ids[index[np.flatnonzero(bad)[0]]]
            overflow = np.isfinite(pooled).all()
            hint = " (too large for float16: extract with --dtype float32)" if overflow else ""
            raise ValueError(f"shard {k}: {int(bad.sum())} vectors are not finite, first {first!r}{hint}")
        final = self.shards_dir / shard_name(k, self.backend.name)
        if final.exists():
            raise CacheError(f"{final}: shard {k} is already written")
        tmp = self.shards_dir / f".shard-{k:05d}.tmp-r{self.rank}-{os.getpid()}"
        _remove(tmp)
        attrs = {
            "shard": k,
            "rows": [rows.start, rows.stop],
            "n_ok": int(len(index)),
            "n_skipped": len(skipped),
            "seconds": float(seconds),
            "skipped": skipped,
        }
        try:
            self.backend.write(tmp, stored, index, attrs)
            _fsync_tree(tmp)
            os.replace(tmp, final)
        except BaseException:
            _remove(tmp)
            raise
        _fsync_dir(self.shards_dir)

    def finish(self, summary: dict | None = None) -> dict:
        """Write the summary into cache.json once every shard is present; return it.

        The totals (utterances, skipped by reason, audio hours, shards, bytes) are computed
        from the shards themselves, so they are right whichever ranks wrote them; the
        caller's keys (throughput, elapsed time...) are added.

        Raises:
            IncompleteCacheError: shards are missing.
        """
        files = _shard_files(self.shards_dir, self.backend.name)
        missing = [k for k in range(self.num_shards) if k not in files]
        if missing:
            raise IncompleteCacheError(
                f"{self.out}: {len(missing)} of {self.num_shards} shards missing "
                f"(first: {missing[:5]}); the summary is written when all ranks are done"
            )
        totals = _totals(self.out, files, self.backend)
        meta = read_meta(self.out)
        meta["summary"] = _jsonable({**(summary or {}), **totals})
        meta["mrlcache_version"] = __version__
        _write_atomic(self.out / META_FILE, json.dumps(meta, indent=2, sort_keys=True) + "\n")
        return meta["summary"]

    def close(self) -> None:
        """Release the rank lock (also released by the kernel if the process dies)."""
        lock = getattr(self, "_lock", None)
        if lock is not None:
            lock.release()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _ours(name: str) -> bool:
    """True for the names a cache directory holds (including writers' temporary files)."""
    return name in (META_FILE, MANIFEST_FILE, SHARDS_DIR, LOCKS_DIR) or re.match(
        rf"^\.({re.escape(META_FILE)}|{re.escape(MANIFEST_FILE)})\.tmp-\d+$", name
    ) is not None


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def _totals(out: Path, files: dict[int, Path], backend) -> dict:
    """Summary numbers computed from the shard files."""
    n_ok = n_skipped = 0
    seconds = 0.0
    by_reason: dict[str, int] = {}
    for path in files.values():
        attrs, _, _ = backend.read_meta(path)
        n_ok += attrs["n_ok"]
        n_skipped += attrs["n_skipped"]
        seconds += attrs["seconds"]
        for reason in attrs["skipped"].values():
            by_reason[reason] = by_reason.get(reason, 0) + 1
    size = sum(p.stat().st_size for p in (out / SHARDS_DIR).rglob("*") if p.is_file())
    return {
        "utterances": n_ok,
        "skipped": n_skipped,
        "skipped_by_reason": dict(sorted(by_reason.items())),
        "audio_hours": seconds / 3600.0,
        "shards": len(files),
        "cache_bytes": size,
    }


# ---------------------------------------------------------------------------- reader


class Shard:
    """One complete shard: its vectors and the ids of the utterances they belong to."""

    def __init__(self, path: Path, backend, attrs: dict, index: np.ndarray, shape: tuple, utt_ids, speakers):
        self.path = path
        self._backend = backend
        self.number = int(attrs["shard"])
        self.index = index  # (n,) manifest rows
        self.skipped = dict(attrs["skipped"])
        self.seconds = float(attrs["seconds"])
        self.shape = shape  # (n, V, D)
        self.utterances = [utt_ids[i] for i in index]
        self.speakers = [speakers[i] for i in index]

    def __len__(self) -> int:
        return self.shape[0]

    def read(self, stream: str = "pooled", view: int | None = None, dtype=np.float32) -> np.ndarray:
        """Vectors of this shard: (n, V, D), or (n, D) for one view."""
        _check_stream(stream)
        n, views, dim = self.shape
        out = np.empty((n, views, dim) if view is None else (n, dim), dtype=dtype)
        self._backend.read_pooled(self.path, out, _check_view(view, views))
        return out


def _check_stream(stream: str) -> None:
    if stream != "pooled":
        raise KeyError(f"stream {stream!r}: this cache holds only 'pooled'")


def _check_view(view, views: int):
    if view is not None and not 0 <= int(view) < views:
        raise IndexError(f"view {view} out of range: the cache holds {views} views (0..{views - 1})")
    return None if view is None else int(view)


class Cache:
    """A cache opened for reading (see :func:`open_cache`).

    Vectors are in cache order: shard by shard, each shard in manifest order, only the
    utterances that have vectors.
    """

    def __init__(self, path: Path, meta: dict, shard_files: dict[int, Path]):
        self.path = path
        self.meta = meta
        self._backend = BACKENDS[meta["format"]]
        self._manifest = read_manifest(path / MANIFEST_FILE)
        utt_ids, speakers, _ = self._manifest
        if len(utt_ids) != meta["num_utterances"]:
            raise CacheError(
                f"{path / MANIFEST_FILE}: {len(utt_ids)} rows but cache.json plans {meta['num_utterances']}"
            )
        self.shards: list[Shard] = []
        for k in sorted(shard_files):
            attrs, index, shape = self._backend.read_meta(shard_files[k])
            if shape[1:] != (self.num_views, self.dim) or len(index) != shape[0]:
                raise CacheError(
                    f"{shard_files[k]}: pooled shape {shape} does not match the cache "
                    f"(views {self.num_views}, pooled_dim {self.dim}); the shard is damaged: "
                    f"delete it and rerun extract"
                )
            self.shards.append(Shard(shard_files[k], self._backend, attrs, index, shape, utt_ids, speakers))
        self.utterances = [u for s in self.shards for u in s.utterances]
        self.speakers = [s_ for s in self.shards for s_ in s.speakers]
        self.skipped = {u: r for s in self.shards for u, r in s.skipped.items()}
        self._position = None

    @property
    def num_views(self) -> int:
        return int(self.meta["views"])

    @property
    def dim(self) -> int:
        return int(self.meta["pooled_dim"])

    @property
    def dtype(self) -> np.dtype:
        """The stored dtype (float16 or float32)."""
        return np.dtype(self.meta["dtype"])

    def __len__(self) -> int:
        return len(self.utterances)

    def __repr__(self) -> str:
        return (
            f"Cache({str(self.path)!r}, utterances={len(self)}, views={self.num_views}, "
            f"dim={self.dim}, dtype={self.meta['dtype']}, format={self.meta['format']}, "
            f"skipped={len(self.skipped)})"
        )

    def iter_shards(self):
        """Yield the shards in cache order (each with .utterances, .speakers, .read())."""
        yield from self.shards

    def read(self, stream: str = "pooled", view: int | None = None, dtype=np.float32) -> np.ndarray:
        """All vectors of ``stream``: (N, V, D), or (N, D) for one view (only that view is read).

        Each shard is read whole straight into its slice of one preallocated array.
        """
        _check_stream(stream)
        view = _check_view(view, self.num_views)
        n = len(self)
        out = np.empty((n, self.num_views, self.dim) if view is None else (n, self.dim), dtype=dtype)
        start = 0
        for shard in self.shards:
            stop = start + len(shard)
            self._backend.read_pooled(shard.path, out[start:stop], view)
            start = stop
        return out

    def index_of(self, utt_ids) -> np.ndarray:
        """Positions (rows of :meth:`read`) of ``utt_ids``; (len(utt_ids),) int64.

        Raises:
            KeyError: some ids have no vector (naming the first few and whether they were skipped).
        """
        if self._position is None:
            self._position = {u: i for i, u in enumerate(self.utterances)}
        pos, missing = self._position, []
        out = np.empty(len(utt_ids), dtype=np.int64)
        for i, u in enumerate(utt_ids):
            p = pos.get(u)
            if p is None:
                missing.append(u)
                p = -1
            out[i] = p
        if missing:
            shown = ", ".join(
                f"{u!r}" + (f" (skipped: {self.skipped[u]})" if u in self.skipped else "")
                for u in missing[:5]
            )
            raise KeyError(f"{len(missing)} utterance ids have no vector in {self.path}: {shown}")
        return out


def open_cache(path, allow_incomplete: bool = False) -> Cache:
    """Open the cache directory ``path`` for reading.

    Raises:
        NotACacheError: path missing or not a cache.
        FormatVersionError: written by an incompatible mrlcache.
        IncompleteCacheError: shards missing (unless ``allow_incomplete``).
    """
    path = Path(path)
    meta = read_meta(path)
    total = num_shards(meta["num_utterances"], meta["shard_size"])
    files = {k: p for k, p in _shard_files(path / SHARDS_DIR, meta["format"]).items() if k < total}
    missing = total - len(files)
    if missing and not allow_incomplete:
        raise IncompleteCacheError(
            f"{path}: {missing} of {total} shards missing (extraction did not finish); "
            f"rerun the same 'mrlcache extract' command to complete it"
        )
    return Cache(path, meta, files)
