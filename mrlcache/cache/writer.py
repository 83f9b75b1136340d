"""Writing a cache: create or resume it, write shards atomically, repair damage, sum up.

One :class:`CacheWriter` per rank. Resume means: open the existing cache, check that the
manifest and the settings are the same, and write the shards that are not done, where
"done" means present *and* sound (a damaged shard is rewritten). See docs/cache-format.md.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from pathlib import Path

import numpy as np

from mrlcache import __version__
from mrlcache.cache import integrity, layout
from mrlcache.cache.backends import BACKENDS
from mrlcache.cache.format import (
    DTYPES,
    FORMAT_VERSION,
    LOCKS_DIR,
    MANIFEST_FILE,
    META_FILE,
    REQUIRED_KEYS,
    SHARDS_DIR,
    SKIPPED_FILE,
    SOURCES_FILE,
    TMP_RE,
    CacheError,
    CacheLockedError,
    DamagedCacheError,
    FormatVersionError,
    IncompleteCacheError,
    NotACacheError,
    SettingsMismatchError,
    jsonable,
    manifest_sha256,
    manifest_text,
    meta_text,
    num_shards,
    read_manifest,
    read_meta,
    settings,
    shard_files,
    shard_name,
)
from mrlcache.cache.locks import RankLock, lock_is_free
from mrlcache.runtime import atomic_write, fsync_dir, fsync_tree, write_exclusive


class CacheWriter:
    """Creates or resumes a cache and writes its shards; one writer per rank.

    Args:
        out: cache directory (created if missing).
        meta: settings the vectors depend on (model_config, backbone, pooled_dim,
            sample_rate, mode, crop_seconds, max_seconds, views, augment, seed, dtype,
            shard_size, ...); must hold ``pooled_dim``, ``views``, ``dtype`` and
            ``shard_size``. ``format_version``, ``mrlcache_version``, ``format``,
            ``num_utterances`` and ``manifest_sha256`` are added here.
        manifest: planned utterances in shard order, objects with ``.utt_id``,
            ``.speaker`` (str or None) and ``.path``.
        backend: a name in ``BACKENDS`` ("zarr" or "hdf5").
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
        if int(meta["shard_size"]) < 1 or int(meta["views"]) < 1:
            raise ValueError("shard_size and views must be positive")
        try:
            records = layout.cache_records(meta)
        except (ValueError, TypeError, KeyError) as err:
            raise ValueError(f"cache metadata: {err}") from None
        for name, record in records.items():
            if record.dtype not in DTYPES or not record.item_shape or min(record.item_shape) < 1:
                raise ValueError(f"cache metadata: stream {name!r} needs a positive shape and a dtype in "
                                 f"{', '.join(DTYPES)}, got {record}")
        self.records = records
        self.out = Path(out)
        self.backend = BACKENDS[backend]
        self.rank = int(rank)
        self._manifest_text = manifest_text(manifest)
        self._utt_ids = [u.utt_id for u in manifest]
        self._speakers = [u.speaker or "" for u in manifest]
        if len(set(self._utt_ids)) != len(self._utt_ids):
            raise ValueError("manifest has duplicate utterance ids")
        self._row_of = {u: i for i, u in enumerate(self._utt_ids)}
        self.meta = jsonable(
            {
                **{k: v for k, v in meta.items() if k not in ("summary", "manifest_sha256")},
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
        lock_path = self.locks_dir / f"rank-{self.rank}.lock"
        try:
            self._lock = RankLock(lock_path)
        except BlockingIOError:
            raise CacheLockedError(
                f"{self.out}: another process is already writing rank {self.rank} of this cache "
                f"(lock {lock_path}); wait for it or stop it"
            ) from None
        try:
            self._create_or_check()
            self._clean_leftovers()
            self._refresh_summary()
        except BaseException:
            self.close()
            raise

    # -- setup

    def _delete_cache(self) -> None:
        """Remove the cache entries at ``out`` (only ours; other files stay)."""
        if self.locks_dir.is_dir():
            for lock in self.locks_dir.glob("rank-*.lock"):
                if not lock_is_free(lock):
                    raise CacheLockedError(
                        f"{self.out}: cannot overwrite, a writer holds {lock}; stop it first"
                    )
        for name in (SHARDS_DIR, LOCKS_DIR):
            if (self.out / name).is_dir():
                shutil.rmtree(self.out / name)
        for name in (META_FILE, MANIFEST_FILE, SKIPPED_FILE, SOURCES_FILE):
            (self.out / name).unlink(missing_ok=True)

    def _create_or_check(self) -> None:
        """Create manifest.tsv and cache.json, or check that the existing ones match ours.

        A manifest.tsv that no longer matches the SHA-256 in cache.json (edited, damaged)
        is rewritten when ours has exactly that hash.
        """
        manifest_path = self.out / MANIFEST_FILE
        if not write_exclusive(manifest_path, self._manifest_text):
            recorded = (_read_meta_if_any(self.out) or {}).get("manifest_sha256")
            if recorded is not None and manifest_sha256(manifest_path) != recorded:
                if hashlib.sha256(self._manifest_text.encode()).hexdigest() != recorded:
                    raise DamagedCacheError(
                        f"{manifest_path}: does not match the SHA-256 recorded in cache.json, and this "
                        f"run's utterance list (paths included) does not either; rerun the command that "
                        f"made the cache, or use --overwrite to start over"
                    )
                atomic_write(manifest_path, self._manifest_text)  # repair: ours is the one recorded
            # Ids and speakers decide the shards; the paths may differ (data moved to
            # another disk) and the stored manifest keeps the first run's paths.
            utt_ids, speakers, _ = read_manifest(manifest_path)
            if utt_ids != self._utt_ids or speakers != self._speakers:
                raise SettingsMismatchError(
                    f"{self.out}: the existing cache was extracted from another utterance list "
                    f"({manifest_path}: {len(utt_ids)} utterances, now {len(self._utt_ids)}; ids or "
                    f"speakers differ); use --overwrite to start over or another --out"
                )
        self.meta["manifest_sha256"] = manifest_sha256(manifest_path)
        meta_path = self.out / META_FILE
        if write_exclusive(meta_path, meta_text(self.meta)):
            fsync_dir(self.out)
            return
        old = read_meta(self.out)
        if old.get("streams") != self.meta.get("streams") and _same_records(old, self.meta):
            self.meta["streams"] = old["streams"]  # the same streams written by an older version
        new, have = settings(self.meta), settings(old)
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
            m = TMP_RE.match(entry.name)
            if not m:
                continue
            rank = int(m.group(2))
            if rank == self.rank or lock_is_free(self.locks_dir / f"rank-{rank}.lock"):
                _remove(entry)

    def _refresh_summary(self) -> None:
        """Recompute a forged or stale summary of a complete cache from its shards."""
        meta = read_meta(self.out)
        summary = meta.get("summary")
        if not isinstance(summary, dict):
            return
        sound = self._sound_shards()
        if len(sound) < self.num_shards:
            return  # shards will be rewritten, and finish() writes a new summary
        computed = integrity.totals(self.out, sound, self.meta, self.backend)
        if integrity.stale_keys(summary, computed):
            meta["summary"] = jsonable({**summary, **computed})
            atomic_write(self.out / META_FILE, meta_text(meta))

    # -- writing

    def shard_rows(self, k: int) -> range:
        """Manifest rows held by shard ``k``."""
        if not 0 <= k < self.num_shards:
            raise IndexError(f"shard {k} out of range (cache has {self.num_shards} shards)")
        return range(k * self.shard_size, min((k + 1) * self.shard_size, len(self._utt_ids)))

    def _sound_shards(self, verify: bool = False) -> dict[int, dict]:
        """{k: attrs} of the shards present and sound (checksums too if ``verify``)."""
        sound = {}
        for k, path in shard_files(self.shards_dir, self.backend.name).items():
            if k >= self.num_shards:
                continue
            try:
                attrs, index = integrity.inspect_shard(self.backend, path, k, self.meta, self._row_of)
            except DamagedCacheError:
                continue
            if verify and integrity.checksum_problems(self.backend, path, attrs, index):
                continue
            sound[k] = attrs
        return sound

    def done_shards(self, verify: bool = False) -> set[int]:
        """Indices of the shards complete and sound on disk (by any rank, any earlier run).

        A damaged shard (missing or short chunks, wrong shape, bad index) is not done, so
        writing it again repairs it; ``verify=True`` also recomputes every checksum (reads
        all vectors).
        """
        return set(self._sound_shards(verify))

    def write_shard(self, k: int, index, pooled, skipped: dict, seconds: float, streams: dict | None = None,
                    windowed: dict | None = None) -> None:
        """Write shard ``k`` atomically: aside, flushed, then renamed into place.

        A damaged shard already under the final name is replaced; a sound one is refused.

        Args:
            k: shard number.
            index: (n_ok,) manifest rows of the vectors, all inside ``shard_rows(k)``.
            pooled: (n_ok, V, D) float array; stored as ``meta["dtype"]``; None when the
                cache has no ``pooled`` stream.
            skipped: {utt_id: reason} of the shard's utterances without vectors; together
                with ``index`` it must cover every row of the shard exactly once.
            seconds: audio seconds decoded for the shard (for the summary).
            streams: the other streams of cache.json's ``streams``, {name: (n_ok, V, *shape)
                or (n_ok, V, *shape, frames) float array, or for a ragged stream a list of
                n_ok arrays (*shape, T_i)}; stored in the stream's dtype (layout.py).
            windowed: {utt_id: number of windows} of the shard's eval utterances computed
                window by window (mrlcache.streams.windows); the summary lists them.
        """
        rows = self.shard_rows(k)
        index = np.asarray(index, dtype=np.int64).reshape(-1)  # (n_ok,)
        views = int(self.meta["views"])
        given = dict(streams or {})
        if pooled is not None:
            given = {"pooled": pooled, **given}
        if set(given) != set(self.records):
            raise ValueError(f"shard {k}: streams given {sorted(given)}, the cache holds {sorted(self.records)}")
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
        arrays = {}
        for name, record in self.records.items():
            arrays.update(layout.stored_arrays(k, record, given[name], len(index), views, self._ids(index)))
        sums = {name: array for name, (array, _) in arrays.items()}
        final = self.shards_dir / shard_name(k, self.backend.name)
        if final.exists():
            # Rare (a rerun rewriting a damaged shard): checking it fully costs one shard read.
            try:
                attrs, old_index = integrity.inspect_shard(self.backend, final, k, self.meta, self._row_of)
                sound = not integrity.checksum_problems(self.backend, final, attrs, old_index)
            except DamagedCacheError:
                sound = False
            if sound:
                raise CacheError(f"{final}: shard {k} is already written")
            _remove(final)  # damaged: this write repairs it
        tmp = self.shards_dir / f".shard-{k:05d}.tmp-r{self.rank}-{os.getpid()}"
        _remove(tmp)
        attrs = {
            "shard": k,
            "rows": [rows.start, rows.stop],
            "n_ok": int(len(index)),
            "n_skipped": len(skipped),
            "seconds": float(seconds),
            "skipped": skipped,
            "sha256": integrity.checksums(index, sums),  # checked by open(verify=True)
            "cache": integrity.cache_binding(self.meta),  # a shard copied from another cache is refused
        }
        if windowed:  # absent otherwise: shards as before windows
            ids = set(self._ids(index))
            stray = [u for u in windowed if u not in ids]
            if stray:
                raise ValueError(f"shard {k}: windowed ids without vectors in this shard: {stray[:3]}")
            attrs["windowed"] = {str(u): int(n) for u, n in sorted(windowed.items())}
        try:
            self.backend.write(tmp, attrs, {**arrays, layout.INDEX: (index, None)})
            fsync_tree(tmp)
            os.replace(tmp, final)
        except BaseException:
            _remove(tmp)
            raise
        fsync_dir(self.shards_dir)

    def _ids(self, index):
        return [self._utt_ids[i] for i in index]

    def finish(self, summary: dict | None = None) -> dict:
        """Write the summary into cache.json once every shard is present and sound; return it.

        The totals (utterances, skipped by reason, audio hours, shards, bytes) are computed
        from the shards themselves, so they are right whichever ranks wrote them; the
        caller's keys (throughput, elapsed time...) are added.

        Raises:
            IncompleteCacheError: shards are missing or damaged.
        """
        sound = self._sound_shards()
        missing = [k for k in range(self.num_shards) if k not in sound]
        if missing:
            raise IncompleteCacheError(
                f"{self.out}: {len(missing)} of {self.num_shards} shards missing "
                f"(first: {missing[:5]}); the summary is written when all ranks are done"
            )
        meta = read_meta(self.out)
        meta["summary"] = jsonable({**(summary or {}), **integrity.totals(self.out, sound, self.meta, self.backend)})
        meta["mrlcache_version"] = __version__
        self._write_skipped(meta["summary"]["skipped_files"])
        atomic_write(self.out / META_FILE, meta_text(meta))
        return meta["summary"]

    def _write_skipped(self, skipped: dict[str, str]) -> None:
        """``skipped.tsv``: every planned utterance that has no vectors, with its reason and path."""
        _, _, paths = read_manifest(self.out / MANIFEST_FILE)
        lines = ["utt_id\treason\tpath"]
        lines += [f"{utt}\t{reason}\t{paths[self._row_of[utt]]}" for utt, reason in skipped.items()]
        atomic_write(self.out / SKIPPED_FILE, "\n".join(lines) + "\n")

    def close(self) -> None:
        """Release the rank lock (also released by the kernel if the process dies)."""
        lock = getattr(self, "_lock", None)
        if lock is not None:
            lock.release()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _same_records(a: dict, b: dict) -> bool:
    try:
        return layout.cache_records(a) == layout.cache_records(b)
    except (ValueError, TypeError, KeyError):
        return False


def _read_meta_if_any(out: Path) -> dict | None:
    try:
        return read_meta(out)
    except (NotACacheError, FormatVersionError, CacheError):
        return None


def _ours(name: str) -> bool:
    """True for the names a cache directory holds (including writers' temporary files)."""
    files = "|".join(re.escape(f) for f in (META_FILE, MANIFEST_FILE, SKIPPED_FILE, SOURCES_FILE))
    return name in (META_FILE, MANIFEST_FILE, SKIPPED_FILE, SOURCES_FILE, SHARDS_DIR, LOCKS_DIR) or re.match(
        rf"^\.({files})\.tmp-[A-Za-z0-9_]+$", name
    ) is not None


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()
