"""Imported vectors into a regular cache, and cached vectors out to files other toolkits read.

:func:`import_vectors` writes a cache (stream ``pooled``, views when the input has them)
that every cache command opens; its ``cache.json`` says where the vectors came from
(``mode: "imported"``, a backbone record ``imported:<name>`` with the source's SHA-256).
:func:`export_vectors` reads a cache, optionally through a fitted head, and
:func:`write_vectors` writes Kaldi ark+scp, ``.npz``, ``.npy`` + ids, or a folder of
``.npy``. Every output is written aside and renamed into place, so a file under its final
name is complete.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mrlcache.interop.readers import InteropError, folder_npy_files, ids_file_for, read_utt2spk, read_vectors, shown, speakers_for
from mrlcache.runtime import publish_dir, publish_files, sha256_file, temp_dir, temp_file, write_aside
from mrlcache.streams.record import StreamRecord

from mrlcache.names import VECTOR_FORMATS as FORMATS  # noqa: E402 (npy, kaldi, npz)
FLOAT16_MAX = float(np.finfo(np.float16).max)


@dataclass(frozen=True)
class _Row:
    """A manifest row as CacheWriter wants it."""

    utt_id: str
    speaker: str | None
    path: str


def source_sha256(path) -> str:
    """SHA-256 of what was imported: the file, or for a folder / an scp the files it names.

    A folder hashes the lines 'relative_path sha256' of its .npy files; an scp hashes its
    own bytes and those of every ark it points to, so moving the data does not change it
    but editing any vector does.
    """
    path = Path(path)
    if path.is_dir():
        lines = [f"{f.relative_to(path).as_posix()} {sha256_file(f)}" for f in folder_npy_files(path)]
        return hashlib.sha256("\n".join(lines).encode()).hexdigest()
    if path.suffix == ".scp":
        from mrlcache.interop.kaldi import parse_scp

        arks = list(dict.fromkeys(e.path for e in parse_scp(path)))  # each ark once, in order
        lines = [sha256_file(path)] + [f"{Path(a).name} {sha256_file(a)}" for a in arks]
        return hashlib.sha256("\n".join(lines).encode()).hexdigest()
    return sha256_file(path)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


# ---------------------------------------------------------------------------- import


def import_vectors(vectors, out, *, ids_file=None, utt2spk=None, name: str | None = None,
                   layout: str | None = None, dtype: str = "float16", shard_size: int = 1000,
                   backend: str = "zarr", overwrite: bool = False) -> dict:
    """Write the vectors of ``vectors`` (any input :func:`read_vectors` takes) as a cache.

    Args:
        vectors: input file or folder.
        out: cache directory; written aside and renamed into place when complete.
        ids_file, layout: as for :func:`read_vectors`.
        utt2spk: Kaldi utt2spk naming every id's speaker (else labels or VoxCeleb ids).
        name: what the vectors are ("wavlm-sv"); default the input's name without suffix.
        dtype: stored dtype, float16 (as extract) or float32.
        shard_size: utterances per shard.
        backend: "zarr" or "hdf5".
        overwrite: replace an existing cache at ``out`` (never a folder that is not a cache).

    Returns:
        the cache's summary (utterances, shards, bytes, ...).
    """
    from mrlcache.cache import CacheWriter

    from mrlcache.paths import check_output

    src, out = Path(vectors), Path(out)
    check_output(out, [src, ids_file, utt2spk], folder=True)
    _check_target(out, overwrite)
    ids, array, labels = read_vectors(src, ids_file=ids_file, layout=layout)
    spk = speakers_for(ids, labels, read_utt2spk(utt2spk) if utt2spk else None, str(src))
    layers = array.ndim == 3 and layout == "layers"  # (N, L, D): a per-layer stream, one view
    pooled = array[:, None] if layers or array.ndim == 2 else array  # (N, V, D) or (N, 1, L, D)
    if dtype == "float16":
        big = np.abs(pooled).reshape(len(ids), -1).max(axis=1) > FLOAT16_MAX
        if big.any():
            raise InteropError(
                f"{src}: values beyond the float16 range in the vectors of ids "
                f"{shown(ids[i] for i in np.flatnonzero(big))}; import with --dtype float32"
            )
    if shard_size < 1:
        raise InteropError(f"--shard-size {shard_size}: must be at least 1")
    if spk is not None:
        unstorable = [s for s in spk if not s or any(c in s for c in "\t\n\r")]
        if unstorable:
            raise InteropError(f"{src}: empty speakers or speakers with tabs/newlines {shown(unstorable)}")

    name = name or (src.name if src.is_dir() else src.stem)
    ids_file = ids_file_for(src, ids_file)
    sha = source_sha256(src)
    row_path = (lambda u: str((src / u).resolve()) + ".npy") if src.is_dir() else (lambda u: str(src.resolve()))
    manifest = [_Row(u, None if spk is None else spk[i], row_path(u)) for i, u in enumerate(ids)]
    meta = {
        "mode": "imported",
        "backbone": {"source": f"imported:{name}", "train_type": None, "dataset": None, "sha256": sha},
        "imported": {
            "name": name,
            "file": str(src.resolve()),
            "sha256": sha,
            "ids_sha256": sha256_file(ids_file) if ids_file else None,
            "utt2spk_sha256": sha256_file(utt2spk) if utt2spk else None,
            "layout": layout if array.ndim == 3 else None,
            "source_dtype": str(array.dtype),
        },
        "pooled_dim": 0 if layers else int(pooled.shape[2]),
        "views": int(pooled.shape[1]),
        "dtype": dtype,
        "shard_size": int(shard_size),
    }
    if layers:
        # Layer stacks are the `layers` stream as per-layer vectors (as extract --layers-pooled
        # stores them), for the multi-stream heads (fit --inputs layers); there is no pooled.
        meta["streams"] = {"layers": StreamRecord("layers", "vector", array.shape[1:3], dtype).to_json()}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir(out)
    try:
        with CacheWriter(tmp, meta, manifest, backend=backend) as writer:
            for k in range(writer.num_shards):
                rows = writer.shard_rows(k)
                part = pooled[rows.start:rows.stop]
                if layers:
                    writer.write_shard(k, np.arange(rows.start, rows.stop), None, {}, 0.0, streams={"layers": part})
                else:
                    writer.write_shard(k, np.arange(rows.start, rows.stop), part, {}, 0.0)
            summary = writer.finish({"imported_from": str(src.resolve())})
        publish_dir(tmp, out)
    except BaseException:
        _remove(tmp)
        raise
    return summary


def _check_target(out: Path, overwrite: bool) -> None:
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return
    if not (out / "cache.json").is_file():
        raise InteropError(f"--out {out}: exists and is not an mrlcache cache; choose another --out")
    if not overwrite:
        raise InteropError(f"--out {out}: a cache is already there; use --overwrite to replace it")


# ---------------------------------------------------------------------------- export


def export_vectors(cache, model=None, dim: int | None = None, view: int = 0):
    """Vectors of a cache, raw or through a fitted head; no audio pass.

    Args:
        cache: cache directory or an opened Cache.
        model: an MRLModel (``mrlcache.models.model.load_model``) or None for the raw cached vectors.
        dim: embedding size (default the model's largest; raw vectors: the cached size only).
        view: which stored view to export.

    Returns:
        ids (N,), vectors (N, dim) float32, speakers (N,) or None when the cache has none.
    """
    from mrlcache import cache as cache_mod

    if not hasattr(cache, "iter_shards"):
        cache = cache_mod.open(cache)
    if not 0 <= view < cache.num_views:
        raise InteropError(f"--view {view}: the cache holds {cache.num_views} views (0..{cache.num_views - 1})")
    if model is None:
        if dim is not None and dim != cache.dim:
            raise InteropError(f"--dim {dim}: raw vectors are {cache.dim}-dimensional; give --model to project them")
        dim = cache.dim
    else:
        from mrlcache.dims import select_dim
        from mrlcache.ranges import RangeError

        try:
            dim = select_dim(dim, model.dims)
        except RangeError as err:
            raise InteropError(str(err)) from None
        if model.head.pooled_dim != cache.dim:
            raise InteropError(f"the model's head takes {model.head.pooled_dim} dims, the cache {cache.path} holds {cache.dim}")
        record = cache.meta.get("backbone") if isinstance(cache.meta.get("backbone"), dict) else {}
        want = cache.meta.get("weights_sha256") or record.get("sha256")
        if model.weights_sha256 and want and model.weights_sha256 != want:
            raise InteropError(
                f"the model was fitted on backbone {model.weights_sha256[:12]}..., the cache {cache.path} "
                f"holds vectors of {want[:12]}...; export with the model fitted on this cache"
            )
    parts = []
    for shard in cache.iter_shards():
        x = shard.read("pooled", view=view, dtype=np.float32)  # (n, D)
        parts.append(x if model is None else model.project(x, dim))  # (n, dim)
    vectors = np.concatenate(parts) if parts else np.zeros((0, dim), np.float32)
    speakers = list(cache.speakers)
    return list(cache.utterances), np.ascontiguousarray(vectors, dtype=np.float32), (speakers if all(speakers) else None)


def _lines(items) -> str:
    return "".join(f"{i}\n" for i in items)


def _utt2spk_text(ids, speakers) -> str:
    return "".join(f"{u} {s}\n" for u, s in zip(ids, speakers))


def write_vectors(ids, vectors, fmt: str, out, speakers=None, overwrite: bool = False) -> list[Path]:
    """Write (N, D) vectors for another toolkit; returns the files/folders written.

    - ``kaldi``: ``OUT.ark`` + ``OUT.scp`` (float vectors, kaldiio's binary format that
      Kaldi and WeSpeaker scoring read) and ``OUT.utt2spk`` when speakers are known;
      ``OUT`` may end in .ark or .scp.
    - ``npz``: arrays ``ids``, ``vectors`` (and ``speakers``).
    - ``npy``: ``OUT.npy`` ends in .npy: one array + ``OUT.ids.txt`` (+ ``OUT.utt2spk``);
      otherwise a folder with ``<id>.npy`` per utterance, ``ids.txt`` (+ ``utt2spk``).
    """
    if fmt not in FORMATS:
        raise InteropError(f"--format {fmt}: choose one of {', '.join(FORMATS)}")
    vectors = np.asarray(vectors, dtype=np.float32)
    ids = [str(u) for u in ids]
    if vectors.ndim != 2 or len(ids) != len(vectors):
        raise InteropError(f"need (N, D) vectors with N ids, got {vectors.shape} and {len(ids)} ids")
    if speakers is not None and not all(speakers):
        raise InteropError("every utterance needs a speaker to write speakers; give none or all")
    spaced = sorted({s for s in speakers or () if any(c.isspace() for c in s)})
    if spaced and fmt != "npz":  # npz stores them as an array; utt2spk lines split on whitespace
        raise InteropError(f"speakers with whitespace cannot be written to utt2spk {shown(spaced)}; use --format npz")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    return {"kaldi": _kaldi, "npz": _npz, "npy": _npy}[fmt](ids, vectors, out, speakers, overwrite)


def output_paths(fmt: str, out) -> list[Path]:
    """What ``write_vectors(ids, vectors, fmt, out)`` writes (utt2spk aside): files, or the folder."""
    out = Path(out)
    if fmt == "kaldi":
        stem = out.with_suffix("") if out.suffix in (".ark", ".scp") else out
        return [stem.with_name(stem.name + ".ark"), stem.with_name(stem.name + ".scp")]
    if fmt == "npz":
        return [out if out.suffix == ".npz" else out.with_name(out.name + ".npz")]
    return [out, out.with_name(out.stem + ".ids.txt")] if out.suffix == ".npy" else [out]


def _refuse_existing(paths, overwrite: bool) -> None:
    there = [str(p) for p in paths if p.exists()]
    if there and not overwrite:
        raise InteropError(f"--out: {', '.join(there)} already exist; use --overwrite or another --out")


def _kaldi(ids, vectors, out, speakers, overwrite):
    import kaldiio

    spaced = [u for u in ids if any(c.isspace() for c in u)]
    if spaced:
        raise InteropError(f"Kaldi keys cannot hold whitespace: ids {shown(spaced)}; use --format npz")
    ark, scp = output_paths("kaldi", out)
    u2s = ark.with_suffix(".utt2spk")
    _refuse_existing([ark, scp] + ([u2s] if speakers else []), overwrite)
    fd, tmp = temp_file(ark)
    made = [tmp]
    try:
        offsets = []  # where each record's data starts: after 'key '
        with os.fdopen(fd, "wb") as f:
            for u, v in zip(ids, vectors):
                offsets.append(f.tell() + len(u.encode()) + 1)
                kaldiio.save_ark(f, {u: v})
            f.flush()
            os.fsync(f.fileno())
        final = str(ark.resolve())  # the scp names the ark under its final name
        sides = [(tmp, ark)]
        if speakers:
            sides.append((write_aside(u2s, _utt2spk_text(ids, speakers)), u2s))
            made.append(sides[-1][0])
        scp_tmp = write_aside(scp, "".join(f"{u} {final}:{o}\n" for u, o in zip(ids, offsets)))
        made.append(scp_tmp)
        publish_files((scp_tmp, scp), sides)  # the scp, the index readers open, last
    except BaseException:
        for path in made:
            path.unlink(missing_ok=True)
        raise
    return [ark] + ([u2s] if speakers else []) + [scp]


def _npz(ids, vectors, out, speakers, overwrite):
    (out,) = output_paths("npz", out)
    _refuse_existing([out], overwrite)
    arrays = {"ids": np.array(ids, dtype=str), "vectors": vectors}
    if speakers:
        arrays["speakers"] = np.array(speakers, dtype=str)
    fd, tmp = temp_file(out)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        publish_files((tmp, out))
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return [out]


def _npy(ids, vectors, out, speakers, overwrite):
    import io

    if out.suffix == ".npy":
        side = output_paths("npy", out)[1]
        u2s = out.with_name(out.stem + ".utt2spk")
        _refuse_existing([out, side] + ([u2s] if speakers else []), overwrite)
        buffer = io.BytesIO()
        np.save(buffer, vectors)
        made = []
        try:
            made.append(write_aside(out, buffer.getvalue()))
            sides = [(write_aside(side, _lines(ids)), side)]
            if speakers:
                sides.append((write_aside(u2s, _utt2spk_text(ids, speakers)), u2s))
            made += [t for t, _ in sides]
            publish_files((made[0], out), sides)  # X.npy, the file readers open, last
        except BaseException:
            for path in made:
                path.unlink(missing_ok=True)
            raise
        return [out] + [final for _, final in sides]
    unsafe = [u for u in ids if u.startswith("/") or any(p in ("", ".", "..") for p in u.split("/"))]
    if unsafe:
        raise InteropError(f"ids that are not relative file paths {shown(unsafe)}; use --format npz or kaldi")
    if out.exists():
        if not overwrite:
            raise InteropError(f"--out {out}: already exists; use --overwrite or another --out")
        if not (out / "ids.txt").is_file():
            raise InteropError(f"--out {out}: not a folder written by export-vectors (no ids.txt); choose another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir(out)
    try:
        for u, v in zip(ids, vectors):
            target = tmp / f"{u}.npy"
            target.parent.mkdir(parents=True, exist_ok=True)
            np.save(target, v)
        (tmp / "ids.txt").write_text(_lines(ids))
        if speakers:
            (tmp / "utt2spk").write_text(_utt2spk_text(ids, speakers))
        publish_dir(tmp, out)
    except BaseException:
        _remove(tmp)
        raise
    return [out]
