"""How n rows are cut into batches (no imports: the fit's data and the rank split both use it)."""


def batch_slices(n: int, batch_size: int) -> list[slice]:
    """Batches covering 0..n; a last batch of one row joins the previous one (BatchNorm)."""
    starts = list(range(0, n, batch_size))
    if len(starts) > 1 and n - starts[-1] == 1:
        starts.pop()
    return [slice(a, b) for a, b in zip(starts, starts[1:] + [n])]
