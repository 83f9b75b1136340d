"""benchmarks/bench_gpu.py runs end to end (--tiny, on the CPU) and reports every kind of row."""

import importlib.util
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def test_bench_gpu_tiny_runs_and_prints_one_table(tmp_path, capsys):
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_gpu.py"
    spec = importlib.util.spec_from_file_location("bench_gpu", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = bench.main(["--tiny", "--device", "cpu", "--json", str(tmp_path / "rows.json")])
    assert [(r["what"], r["engine"]) for r in rows] == [("forward", "torch"), ("forward", "fused"),
                                                        ("extract", "torch"), ("fit", "-")]
    assert all(r["value"] and r["value"] > 0 for r in rows)
    out = capsys.readouterr().out
    assert out.count("| what | engine | model |") == 1 and "of the bare forward" in out
    assert (tmp_path / "rows.json").is_file()
