"""BatchNorm over the global batch of N ranks: torch's SyncBatchNorm on GPUs, our own on the CPU.

:func:`sync_batchnorm` swaps every BatchNorm of a model in place before DDP wraps it
(:mod:`mrlcache.distributed`), so N ranks x batch B normalise as one process with batch N*B.
"""

from __future__ import annotations

import functools


def _world() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def sync_batchnorm(module) -> None:
    """Replace every BatchNorm under ``module`` (in place) by one whose training statistics
    are over the global batch: torch's SyncBatchNorm on GPUs, :func:`_cpu_sync_bn`'s on the CPU.

    Parameters and buffers are kept (the optimiser holds them); state dicts keep their keys,
    so checkpoints load into plain BatchNorm models.
    """
    import torch

    for name, child in list(module.named_children()):
        if isinstance(child, torch.nn.modules.batchnorm._BatchNorm) and not isinstance(
                child, (torch.nn.SyncBatchNorm, _cpu_sync_bn())):
            cls = torch.nn.SyncBatchNorm if child.weight is not None and child.weight.is_cuda else _cpu_sync_bn()
            new = cls(child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats)
            # The same parameter and buffer objects: the optimiser, built before, steps them.
            if child.affine:
                new.weight, new.bias = child.weight, child.bias
            if child.track_running_stats:
                new.running_mean, new.running_var = child.running_mean, child.running_var
                new.num_batches_tracked = child.num_batches_tracked
            new.train(child.training)
            setattr(module, name, new)
        else:
            sync_batchnorm(child)


@functools.cache
def _cpu_sync_bn():
    """The class of a BatchNorm whose training statistics are summed over the ranks (torch's SyncBatchNorm is GPU-only).

    The sums and row count, then the squared deviations from the global mean, go through
    differentiable all-reduces, so the backward pass all-reduces their gradients too: the
    same forward and gradients as one BatchNorm over the global batch, up to float
    rounding. Eval mode is plain BatchNorm.
    """
    import torch
    import torch.distributed.nn.functional as dist_nn

    class _CpuSyncBatchNorm(torch.nn.modules.batchnorm._BatchNorm):
        def _check_input_dim(self, x):
            if x.dim() < 2:
                raise ValueError(f"expected at least 2D input (got {x.dim()}D input)")

        def forward(self, x):
            if not self.training or _world() == 1:
                return super().forward(x)
            c = x.shape[1]
            dims = [0, *range(2, x.dim())]
            shape = [1, c] + [1] * (x.dim() - 2)
            xf = x.float()  # the sums in float32 whatever the autocast
            # Two passes, as BatchNorm itself: the global mean, then the global mean square
            # deviation (E[x^2] - E[x]^2 would cancel badly for inputs far from zero).
            count = torch.tensor([x.numel() / c], dtype=torch.float32, device=x.device)
            sums = dist_nn.all_reduce(torch.cat([xf.sum(dims), count]))
            n = sums[-1]
            mean = sums[:c] / n
            dev = xf - mean.view(shape)
            var = dist_nn.all_reduce((dev * dev).sum(dims)) / n  # biased, as BatchNorm normalises
            if self.track_running_stats:
                with torch.no_grad():
                    self.num_batches_tracked += 1
                    m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                    self.running_mean.lerp_(mean, m)
                    self.running_var.lerp_(var * n / (n - 1).clamp_min(1), m)
            y = dev * torch.rsqrt(var.view(shape) + self.eps)
            if self.affine:
                y = y * self.weight.view(shape) + self.bias.view(shape)
            return y.to(x.dtype)

    _CpuSyncBatchNorm.__name__ = _CpuSyncBatchNorm.__qualname__ = "CpuSyncBatchNorm"
    return _CpuSyncBatchNorm
