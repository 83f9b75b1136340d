"""Streamed against in-memory fits, pooled and one frame stream, and OpenMP's wait policy (by hand).

Writes synthetic caches with the library's writer (VoxCeleb2 geometry scaled down to the
disk and the time at hand: pooled (rows, 6 views, 2304) float16 over 5,994 speakers; an
fbank-like frame stream (80, 200) float16), then runs one-epoch fits in subprocesses,
interleaved and repeated: ``--memory-gb 64`` (in memory), then for each number of
``--passes`` a budget that holds that fraction of the training rows per read (streamed in
that many passes; the budget is computed from the in-memory run's plan: what the process
holds beside the features, one shard's read and two passes), each under
``OMP_WAIT_POLICY=PASSIVE`` and/or OpenMP's default (``--waits``). Reports samples/s
(history.jsonl), the epoch's seconds, the subprocess's peak RSS against the budget, the
passes, the bytes read from the disk, streamed / in memory (the in-memory run of the same
round), and whether the losses equal the in-memory run's (they must: the order does not
depend on the budget); a markdown table at the end. ``--cold`` drops the shards' pages
from the page cache (``posix_fadvise(DONTNEED)``) before every run and before every
streamed pass's read, so every pass reads from the disk, as with a cache far larger than
the machine's memory; ``--before DIR`` interleaves streamed runs of another checkout (e.g. main).

    python benchmarks/bench_streaming.py --out /tmp/bench-streaming --rows 36000 --frame-rows 4000 --repeats 2 --waits PASSIVE --passes 2,4,8,15

``--reads``: the reading alone of one epoch in each number of ``--passes`` (the fit's own
``epoch_plan`` and ``Features._read_pass``, no training), from the page cache and with
every pass's pages dropped first, in this checkout and ``--before``'s; wall and CPU
seconds per epoch.

    python benchmarks/bench_streaming.py --out /tmp/bench-streaming --reads --repeats 1 --passes 1,2,4,8,15 --before /work/main

``--scale``: the VoxCeleb2 geometry itself (1,092,009 utterances x 6 views x 2304 float16,
30.2 GB; noise from a bank of rows, so writing is bound by the writer and the disk, not
the random generator), the write timed; then streamed fits under ``--memory-gb`` on 1
process and on ``--procs`` processes (torchrun, gloo), each stopped after ``--steps``
batches per process read in the streamed order (the epoch's first windows: the timing
covers the first window's read, which later windows overlap with training), with peak RSS
per process; and, with ``--frame-gb``, an fbank-like frame cache of that size timed the
same way. The epoch and 30 epochs are projected from the steps' rate.

    python benchmarks/bench_streaming.py --out /tmp/bench-scale --scale --steps 200 --memory-gb 2

``--layouts``: what one streamed epoch's reads of a pooled shard cost (the views the
epoch draws per row, from the fit's own ``epoch_plan``), stored and read each way: one chunk
per view (mrlcache's layout) read whole then taken, or as a row selection, or as byte
ranges of the drawn rows (the backends' ``read_rows``, what the reader does); zarr v3's
sharding codec with inner chunks of 1 or 4 rows x 1 view (only the drawn rows' inner chunks
fetched); HDF5 (one chunk per view) whole or by rows; raw preads of the drawn rows from the
zarr chunk files. Cold (pages dropped with posix_fadvise) and warm; ms per shard and bytes
read from the disk (/proc/self/io).

    python benchmarks/bench_streaming.py --out /tmp/bench-layouts --layouts --layout-passes 1  (then 4, 15)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

VOX2 = 1_092_009
RUN = """
import itertools, json, os, sys, time
from mrlcache.fit import fit
opts = json.loads(sys.argv[1])
steps = int(os.environ.get("BENCH_STEPS", "0"))
marks = []  # when the epoch began, then when each batch was handed to the step
if steps:  # stop each epoch after `steps` batches (of this process), read in the streamed order
    from mrlcache.fit import data
    epoch = data.Features.epoch

    def timed(self, *a, **k):
        marks.append(time.perf_counter())
        for batch in itertools.islice(epoch(self, *a, **k), steps):
            marks.append(time.perf_counter())
            yield batch
    data.Features.epoch = timed
drop = os.environ.get("BENCH_DROP")
if drop:  # --cold: the shards' pages out of the page cache before every pass's read (a cache far larger than RAM)
    from pathlib import Path
    from mrlcache.fit import data as _data
    read_pass = _data.Features._read_pass

    def cold_pass(self, *a, **k):
        for f in Path(drop).rglob("*"):
            if f.is_file():
                fd = os.open(f, os.O_RDONLY)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                os.close(fd)
        return read_pass(self, *a, **k)
    _data.Features._read_pass = cold_pass
from mrlcache.fit import data as _data
_epoch = _data.Features.epoch
cpu = []  # the process's CPU seconds (every thread) over each epoch: what the load distorts least


def cpu_timed(self, *a, **k):
    start = time.process_time()
    yield from _epoch(self, *a, **k)
    cpu.append(time.process_time() - start)
_data.Features.epoch = cpu_timed
def io(key):
    return int(next(l for l in open("/proc/self/io") if l.startswith(key + ":")).split()[1])
t, read0 = time.perf_counter(), io("read_bytes")
run = fit(sys.argv[2], (64, 128, 192, 256), sys.argv[3], **opts)
import mrlcache
got = {"mrlcache": os.path.dirname(mrlcache.__file__), "wall": time.perf_counter() - t, "epoch_cpu_s": sum(cpu), "read_gb": (io("read_bytes") - read0) / 2**30,
       "rank": int(os.environ.get("RANK", "0")), "first_batch_s": marks[1] - marks[0] if steps else None,
       "steady_steps_s": marks[-1] - marks[1] if steps else None,
       "vmhwm_gb": int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM:")).split()[1]) / 2**20}
if got["rank"] == 0:
    h = [json.loads(x) for x in open(str(run) + "/history.jsonl")]
    s = json.loads(open(str(run) + "/summary.json").read())
    got.update(samples_per_s=h[-1]["samples_per_s"], seconds=h[-1]["seconds"], features=s["features"],
               memory=s["memory"])
print(json.dumps(got))
"""


def write_pooled(out: Path, rows: int, speakers: int, views: int = 6, dim: int = 2304, bank: int = 0) -> None:
    """``bank`` > 0: noise rows drawn from a bank of that many (fast at VoxCeleb2 scale)."""
    from mrlcache import cache
    from mrlcache.corpus import Utterance

    if (out / "cache.json").exists():
        return
    rng = np.random.default_rng(0)
    spk = np.arange(rows) % speakers
    centres = rng.standard_normal((speakers, dim), dtype=np.float32)
    noise = rng.standard_normal((bank, views, dim), dtype=np.float32) if bank else None
    manifest = [Utterance(f"id{s:05d}/v/{i:07d}.wav", f"/none/{i}.wav", f"id{s:05d}") for i, s in enumerate(spk)]
    meta = {"model_config": {"synthetic": True}, "weights_sha256": "0" * 64, "pooled_dim": dim, "sample_rate": 16000,
            "mode": "train", "crop_seconds": 2.0, "views": views, "augment": {}, "seed": 0, "dtype": "float16",
            "shard_size": 1000}
    with cache.CacheWriter(out, meta, manifest) as writer:
        for k in range(writer.num_shards):
            r = np.array(writer.shard_rows(k))
            x = (noise[(r * 7919) % bank] if bank else rng.standard_normal((len(r), views, dim), dtype=np.float32))
            x += centres[spk[r]][:, None]
            writer.write_shard(k, r, x, {}, seconds=0.0)
        writer.finish()


def write_frames(out: Path, rows: int, speakers: int, views: int = 2, bins: int = 80, frames: int = 200,
                 bank: int = 0) -> None:
    """``bank`` > 0: noise items drawn from a bank of that many (fast at scale)."""
    from mrlcache import cache
    from mrlcache.corpus import Utterance
    from mrlcache.streams import StreamRecord

    if (out / "cache.json").exists():
        return
    rng = np.random.default_rng(1)
    spk = np.arange(rows) % speakers
    centres = rng.standard_normal((speakers, bins, 1), dtype=np.float32)
    noise = rng.standard_normal((bank, views, bins, frames), dtype=np.float32) if bank else None
    manifest = [Utterance(f"id{s:05d}/v/{i:07d}.wav", f"/none/{i}.wav", f"id{s:05d}") for i, s in enumerate(spk)]
    record = StreamRecord("fbank", "frames", (bins,), "float16", 100.0, False, frames)
    meta = {"model_config": None, "pooled_dim": 0, "sample_rate": 16000, "mode": "train", "crop_seconds": 2.0,
            "views": views, "augment": {}, "seed": 0, "dtype": "float16", "shard_size": 500,
            "streams": {"fbank": record.to_json()}}
    with cache.CacheWriter(out, meta, manifest) as writer:
        for k in range(writer.num_shards):
            r = np.array(writer.shard_rows(k))
            x = (noise[(r * 7919) % bank] if bank
                 else rng.standard_normal((len(r), views, bins, frames), dtype=np.float32))
            x += centres[spk[r]][:, None]
            writer.write_shard(k, r, None, {}, 0.0, streams={"fbank": x})
        writer.finish()


def one(cache: Path, run: Path, opts: dict, wait: str | None, procs: int = 1, steps: int = 0,
        tree: str | None = None, cold: bool = False) -> dict:
    """One fit in a subprocess (``procs`` > 1: under torchrun, gloo): rank 0's numbers, the
    peak RSS of the largest process (wait4's rusage; ``rank_peak_gb``: each rank's VmHWM)
    and the bytes each rank read from the disk (``read_gb``, /proc/self/io); ``tree``: the
    mrlcache checkout it imports (first on PYTHONPATH; None: as this process's); ``cold``:
    the cache's pages dropped before every streamed pass's read."""
    env = dict(os.environ, BENCH_STEPS=str(steps))
    if cold:
        env["BENCH_DROP"] = str(cache / "shards")
    if tree:
        env["PYTHONPATH"] = tree
    env.pop("OMP_WAIT_POLICY", None)
    if wait:
        env["OMP_WAIT_POLICY"] = wait
    script = Path(str(run) + ".py")
    script.write_text(RUN)
    cmd = [sys.executable, str(script)]
    if procs > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}",
               str(script)]
        env["OMP_NUM_THREADS"] = "1"
    with open(str(run) + ".stderr", "w") as err:
        proc = subprocess.Popen([*cmd, json.dumps(opts), str(cache), str(run)],
                                stdout=subprocess.PIPE, stderr=err, env=env, text=True)
        out = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
    if status:
        raise SystemExit(Path(str(run) + ".stderr").read_text()[-3000:])
    ranks = sorted((json.loads(x) for x in out.strip().splitlines() if x.startswith("{")), key=lambda g: g["rank"])
    got = dict(ranks[0], procs=procs, steps=steps)
    if got["rank"] == 0 and (run / "history.jsonl").exists():
        got["loss"] = [json.loads(x)["loss"] for x in (run / "history.jsonl").read_text().splitlines()]
    got["peak_rss_gb"] = usage.ru_maxrss / 2**20
    got["rank_peak_gb"] = [g["vmhwm_gb"] for g in ranks]
    got["read_gb"] = [round(g["read_gb"], 3) for g in ranks]
    if steps > 1:  # the steps after the first window's read (later windows are read while training)
        got["steady_samples_per_s"] = (steps - 1) * opts["batch_size"] * procs / got["steady_steps_s"]
    return got


def streamed_budget(cache_dir: Path, memory: dict, passes: int) -> float:
    """--memory-gb that holds 1/``passes`` of the training rows per read, from an in-memory
    run's plan (``memory``: its summary's ``memory``): the rest of the process, one shard's
    read (one view, whole, and its rows) and two passes (one training, one being read)."""
    from mrlcache import cache
    from mrlcache.fit.memory import ROW_INDEX_BYTES

    c = cache.open(cache_dir)
    rows, views = len(c), int(c.num_views)
    fixed = memory["estimate_bytes"] - memory["features_bytes"]
    held = memory["features_bytes"] // (rows * views) + ROW_INDEX_BYTES
    stored = sum(r.row_bytes(1) for r in c.streams.values() if not r.ragged)
    read = 2 * max(len(s) for s in c.shards) * stored
    return (fixed + read + 2 * held * (-(-rows // passes) + 1)) / 2**30  # +1: the plan's rounding up


def scale(args) -> None:
    """VoxCeleb2 geometry written with the library's writer, then ``--steps`` streamed steps timed."""
    rows = []
    base = dict(epochs=1, batch_size=args.batch, head_only=True, progress=False, val_speakers=0, warmup_epochs=0,
                margin_warmup_epochs=0, memory_gb=args.memory_gb)
    kinds = {"pooled": dict(base)}
    if "pooled" in args.only:
        tick = time.perf_counter()
        write_pooled(args.out / "pooled", args.scale_rows, 5994, bank=4096)
        rows.append({"kind": "pooled", "write_s": time.perf_counter() - tick, "load": os.getloadavg()[0]})
        print(json.dumps(rows[-1]), flush=True)
    if "fbank" in args.only:
        frame_rows = int(args.frame_gb * 2**30 / (2 * 80 * 200 * 2))  # 2 views x (80, 200) float16
        kinds["fbank"] = dict(base, inputs="fbank", encoder_dim=128)
        tick = time.perf_counter()
        write_frames(args.out / "fbank", frame_rows, 5994, bank=1024)
        rows.append({"kind": "fbank", "rows": frame_rows, "write_s": time.perf_counter() - tick,
                     "load": os.getloadavg()[0]})
        print(json.dumps(rows[-1]), flush=True)
    for kind in args.only.split(","):
        for procs in (1, args.procs):
            run = args.out / f"run-{kind}-{procs}"
            shutil.rmtree(run, ignore_errors=True)
            load = os.getloadavg()[0]
            opts = dict(kinds[kind], batch_size=args.batch // procs)  # the same rows per step
            got = one(args.out / kind, run, opts, "PASSIVE", procs=procs, steps=args.steps)
            got.update(kind=kind, load_before=load, load_after=os.getloadavg()[0])
            rows.append(got)
            print(json.dumps(got), flush=True)
    (args.out / "scale.json").write_text(json.dumps(rows, indent=1))


def _disk_read() -> int:
    return int(next(x for x in open("/proc/self/io") if x.startswith("read_bytes:")).split()[1])


def _drop(root: Path) -> None:
    for f in root.rglob("*"):
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)


def layouts(args, shards: int = 20, n: int = 1000, views: int = 6, dim: int = 2304) -> None:
    """Read the drawn views of ``shards`` pooled shards every way (see the module docstring)."""
    import h5py
    import torch
    import zarr
    from zarr.storage import LocalStore

    from mrlcache.cache import BACKENDS, byteranges
    from mrlcache.fit.data import epoch_plan

    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, views, dim), dtype=np.float32).astype(np.float16)
    root = args.out / "layouts"
    for form in ("view", "inner1", "inner4", "hdf5"):
        for k in range(shards):
            path = root / form / f"s{k}"
            if path.exists():
                continue
            path.parent.mkdir(parents=True, exist_ok=True)
            if form == "hdf5":
                BACKENDS["hdf5"].write(path, {"skipped": {}}, {"pooled": (x, (n, 1, dim))})
            elif form == "view":
                BACKENDS["zarr"].write(path, {}, {"pooled": (x, (n, 1, dim))})
            else:
                group = zarr.open_group(LocalStore(str(path)), mode="w-")
                group.create_array("pooled", shape=x.shape, shards=x.shape, chunks=(int(form[5:]), 1, dim),
                                   dtype=x.dtype, compressors=None, fill_value=0)[...] = x
    drawn, _ = epoch_plan(torch.Generator().manual_seed(0), np.full(shards, n), np.ones(shards * n, bool), views,
                          1, 256)
    drawn = drawn.reshape(shards, n)
    # the rows of one pass of --layout-passes: a random 1/passes of each shard's rows
    in_pass = np.random.default_rng(1).random((shards, n)) < 1 / args.layout_passes

    def pread_rows(path, v, sel, advice=None):
        out = np.empty((len(sel), dim), np.float16)
        fd = os.open(path / "pooled" / "c" / "0" / str(v) / "0", os.O_RDONLY)
        if advice is not None:
            os.posix_fadvise(fd, 0, 0, advice)
        for i, r in enumerate(sel):
            os.preadv(fd, [memoryview(out[i]).cast("B")], int(r) * dim * 2)
        os.close(fd)
        return out

    def rows_of(backend, gap=None):
        def read(p, v, s):
            byteranges.GAP_BYTES = default_gap if gap is None else gap
            return BACKENDS[backend].read_rows(p, "pooled", v, s, np.empty((len(s), dim), np.float16))
        return read

    default_gap = byteranges.GAP_BYTES
    zarr_read = BACKENDS["zarr"].read_array
    ways = {  # name: (form, read(path, view, rows) -> (len(rows), dim))
        "zarr, one chunk per view: whole view, take": ("view", lambda p, v, s: zarr_read(
            p, "pooled", (slice(None), v))[s]),
        "zarr, one chunk per view: row selection": ("view", lambda p, v, s: zarr_read(p, "pooled", (s, v))),
        "zarr, one chunk per view: raw preads of the rows": ("view", pread_rows),
        "zarr, one chunk per view: raw preads of the rows, readahead off": ("view", lambda p, v, s: pread_rows(
            p, v, s, os.POSIX_FADV_RANDOM)),
        "zarr, one chunk per view: the backend's read_rows (the reader now)": ("view", rows_of("zarr")),
        "zarr, one chunk per view: read_rows, one read per run (no gap allowance)": ("view", rows_of("zarr", 0)),
        "hdf5, one chunk per view: the backend's read_rows (the reader now)": ("hdf5", rows_of("hdf5")),
        "hdf5, one chunk per view: read_rows, one read per run (no gap allowance)": ("hdf5", rows_of("hdf5", 0)),
        "zarr sharded, inner chunks 1 row x 1 view": ("inner1", lambda p, v, s: zarr_read(p, "pooled", (s, v))),
        "zarr sharded, inner chunks 4 rows x 1 view": ("inner4", lambda p, v, s: zarr_read(p, "pooled", (s, v))),
        "hdf5, one chunk per view: whole view, take": ("hdf5", lambda p, v, s: BACKENDS["hdf5"].read_array(
            p, "pooled", (slice(None), v))[s]),
        "hdf5, one chunk per view: row selection": ("hdf5", lambda p, v, s: BACKENDS["hdf5"].read_array(
            p, "pooled", (s, v))),
    }
    print(f"load {os.getloadavg()[0]:.1f}; rows of one pass of {args.layout_passes}; {shards} shards of {n} x {views} x {dim} float16 "
          f"({n * views * dim * 2 / 1e6:.1f} MB each)")
    print("| read | cold ms/shard | cold MB from disk/shard | warm ms/shard |\n|---|---|---|---|")
    for label, (form, read) in ways.items():
        if args.layout_skip and args.layout_skip in label:
            continue
        got = []
        for cold in (True, False):
            if cold:
                _drop(root / form)
            t, b = time.perf_counter(), _disk_read()
            for k in range(shards):
                for v in range(views):
                    sel = np.flatnonzero((drawn[k] == v) & in_pass[k])
                    assert np.array_equal(read(root / form / f"s{k}", v, sel), x[sel, v])
            got += [(time.perf_counter() - t) * 1e3 / shards, (_disk_read() - b) / 1e6 / shards]
        print(f"| {label} | {got[0]:.0f} | {got[1]:.1f} | {got[2]:.0f} |", flush=True)


READS = """
import json, os, sys, time
from pathlib import Path
import numpy as np
import mrlcache
from mrlcache import cache
from mrlcache.fit.data import Features, epoch_generator, epoch_plan, passes
c = cache.open(sys.argv[1])
name = sys.argv[2]
rows, cold, got = len(c), sys.argv[4] == "cold", []
labels = np.arange(rows) % 500
for p in map(int, sys.argv[3].split(",")):
    feats = Features(c, {name: c.streams[name]}, labels, np.float16, "streamed", None, -(-rows // p))
    views, plan = epoch_plan(epoch_generator(0, 0), feats.sizes, feats.train_mask, feats.num_views, feats.group, 256)
    runs = [run for _, batches in plan for run in passes(batches, feats.pass_rows)]
    wall = cpu = 0.0
    for run in runs:
        if cold:  # every pass from the disk, as with a cache far larger than RAM
            for f in Path(sys.argv[1], "shards").rglob("*"):
                if f.is_file():
                    fd = os.open(f, os.O_RDONLY)
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                    os.close(fd)
        t, u = time.perf_counter(), time.process_time()
        feats._read_pass(np.concatenate(run), views)
        wall, cpu = wall + time.perf_counter() - t, cpu + time.process_time() - u
    got.append({"passes": len(runs), "read_s": wall, "read_cpu_s": cpu})
print(json.dumps({"mrlcache": os.path.dirname(mrlcache.__file__), "got": got}))
"""


def reads(args) -> None:
    """``--reads``: the reading alone (no training) of one epoch's passes, this tree and ``--before``."""
    write_pooled(args.out / "pooled", args.rows, 5994)
    write_frames(args.out / "fbank", args.frame_rows, 500)
    script = args.out / "reads.py"
    script.write_text(READS)
    trees = {"this": None, **({"before": str(args.before)} if args.before else {})}
    print("| stream | pages | tree | passes | read s per epoch | read CPU s per epoch | load |\n|---|---|---|---|---|---|---|")
    for rep in range(args.repeats):
        for kind in args.only.split(","):
            for pages in ("cached", "cold"):
                for tree, path in trees.items():
                    env = dict(os.environ, **({"PYTHONPATH": path} if path else {}))
                    load = os.getloadavg()[0]
                    out = subprocess.run([sys.executable, str(script), str(args.out / kind), kind, args.passes, pages],
                                         env=env, capture_output=True, text=True, check=True).stdout
                    for g in json.loads(out.strip().splitlines()[-1])["got"]:
                        print(f"| {kind} | {pages} | {tree} | {g['passes']} | {g['read_s']:.2f} | "
                              f"{g['read_cpu_s']:.2f} | {load:.1f} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--rows", type=int, default=36_000)
    ap.add_argument("--frame-rows", type=int, default=8_000)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--waits", default="PASSIVE,default")
    ap.add_argument("--passes", default="2,4,8,15",
                    help="streamed runs: passes per epoch, one run each (sets their budgets), e.g. 2,4,8,15")
    ap.add_argument("--cold", action="store_true",
                    help="drop the shards' pages (posix_fadvise DONTNEED) before every run and every streamed pass")
    ap.add_argument("--before", type=Path, default=None,
                    help="a checkout of mrlcache whose streamed runs are interleaved with this one's")
    ap.add_argument("--only", default="pooled,fbank")
    ap.add_argument("--scale", action="store_true", help="VoxCeleb2 geometry, --steps timed (see above)")
    ap.add_argument("--layouts", action="store_true", help="the read of a shard's drawn views, every way")
    ap.add_argument("--reads", action="store_true", help="one epoch's reads alone, in each number of --passes")
    ap.add_argument("--layout-passes", type=int, default=1, help="--layouts: read the rows of one pass of this many")
    ap.add_argument("--layout-skip", default="", help="--layouts: skip the reads whose label holds this")
    ap.add_argument("--steps", type=int, default=200, help="--scale: batches per process")
    ap.add_argument("--memory-gb", type=float, default=2.0, help="--scale: the fit's budget")
    ap.add_argument("--procs", type=int, default=2, help="--scale: processes of the torchrun fit")
    ap.add_argument("--batch", type=int, default=256, help="--scale: rows per step (split over --procs)")
    ap.add_argument("--scale-rows", type=int, default=VOX2, help="--scale: utterances of the pooled cache")
    ap.add_argument("--frame-gb", type=float, default=0.0, help="--scale: size of the frame cache (0: none)")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.scale:
        return scale(args)
    if args.layouts:
        return layouts(args)
    if args.reads:
        return reads(args)
    tick = time.perf_counter()
    write_pooled(args.out / "pooled", args.rows, 5994)
    write_frames(args.out / "fbank", args.frame_rows, 500)
    print(f"caches ready in {time.perf_counter() - tick:.0f} s", flush=True)
    base = dict(epochs=1, batch_size=256, head_only=True, progress=False, val_speakers=0, warmup_epochs=0,
                margin_warmup_epochs=0)
    kinds = {"pooled": dict(base), "fbank": dict(base, inputs="fbank", encoder_dim=128)}
    trees = {"": None, **({"before": str(args.before)} if args.before else {})}
    passes = [int(p) for p in str(args.passes).split(",")]
    rows, budgets, losses = [], {}, {}
    for rep in range(args.repeats):
        for kind in args.only.split(","):
            for wait in args.waits.split(","):
                # interleaved: memory, then streamed in each number of passes (and by the --before tree)
                # a memory run before each number of passes: each ratio against the run next to it
                runs = [r for p in passes for r in [("memory", None, "")] + [("streamed", p, t) for t in trees]]
                memory_rate = memory_cpu = None
                for policy, p, tree in runs:
                    budget = 64.0 if policy == "memory" else budgets[kind, p]
                    run = args.out / f"run-{kind}-{wait}-{policy}{p or ''}{tree}-{rep}"
                    shutil.rmtree(run, ignore_errors=True)
                    if args.cold:  # the shards' pages out of the page cache: every read goes to the disk
                        _drop(args.out / kind / "shards")
                    load = os.getloadavg()[0]
                    got = one(args.out / kind, run, dict(kinds[kind], memory_gb=budget),
                              None if wait == "default" else wait, tree=trees[tree], cold=args.cold)
                    if policy == "memory":
                        memory_rate, memory_cpu = got["samples_per_s"], got["epoch_cpu_s"]
                        for q in passes:
                            budgets.setdefault((kind, q), streamed_budget(args.out / kind, got["memory"], q))
                    losses.setdefault(kind, got["loss"])
                    got.update(kind=kind, wait=wait, budget=budget, repeat=rep, load_before=load, tree=tree or "this",
                               load_after=os.getloadavg()[0], same_loss=got["loss"] == losses[kind],
                               passes=got["memory"]["passes_per_epoch"],
                               ratio=round(got["samples_per_s"] / memory_rate, 3),
                               cpu_ratio=round(memory_cpu / got["epoch_cpu_s"], 3))
                    rows.append(got)
                    print(json.dumps(got), flush=True)
    (args.out / "results.json").write_text(json.dumps(rows, indent=1))
    print("| stream | tree | features | --memory-gb | passes | samples/s | epoch s | peak RSS GB | GiB read from disk "
          "| load before / after | epoch CPU s | streamed / memory (wall, CPU) |\n|---|---|---|---|---|---|---|---|---|---|---|---|")
    for g in rows:
        print(f"| {g['kind']} | {g['tree']} | {'streamed' if g['passes'] else 'memory'} | {g['budget']:.3g} | "
              f"{g['passes'] or '-'} | {g['samples_per_s']:,.0f} | {g['seconds']:.1f} | {g['peak_rss_gb']:.2f} | "
              f"{g['read_gb'][0]:.2f} | {g['load_before']:.1f} / {g['load_after']:.1f} | "
              f"{g['epoch_cpu_s']:.1f} | {(str(g['ratio']) + ', ' + str(g['cpu_ratio'])) if g['passes'] else ''} |")

if __name__ == "__main__":
    main()
