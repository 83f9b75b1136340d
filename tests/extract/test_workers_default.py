"""extract's default number of decoding workers (mrlcache.extract.run.default_workers)."""

import os

import pytest
import torch

from mrlcache.extract.run import default_workers


@pytest.mark.parametrize("cores,threads,cpu_workers,gpu_workers", [(2, 2, 0, 1), (4, 2, 1, 3), (1, 1, 0, 1), (16, 4, 1, 8)])
def test_a_worker_only_where_a_core_is_left_beside_the_model(monkeypatch, cores, threads, cpu_workers, gpu_workers):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        assert default_workers(torch.device("cpu")) == cpu_workers
        assert default_workers(torch.device("cuda", 0)) == gpu_workers
    finally:
        torch.set_num_threads(before)
