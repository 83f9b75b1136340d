"""Starting and training the heads of :mod:`mrlcache.models.adaptor` from the encoder's own embedding.

The comparison a user makes is against the encoder's published embedding ``e = W x + b``
(its embedding layer: ReDimNet's BN + Linear [+ BN], ECAPA's BN + 1x1 conv, CAM++'s
Linear + BN; affine in eval mode, read by probing it, :func:`affine_of`) and that
embedding truncated after PCA or LDA. An orthogonal rotation ``Q`` of ``e`` leaves every
full-size cosine score unchanged, and its prefixes are nested embeddings; the whitened LDA
of ``e`` (``eer --baseline lda``) is not a rotation but is often the better prefix. The
starts (:func:`start_transform`, ``R (e - m)``):

- ``pca`` / ``lda``: ``R`` the PCA or LDA directions of the training cache's published
  embeddings, orthonormalised (a rotation; ``m`` = 0 unless ``--init-center``);
- ``whitened``: ``R``, ``m`` exactly eer's LDA baseline (every prefix scores as it does);
- ``auto``: all of them and the centred PCA (eer's pca baseline), scored on the validation
  trials before any step; :func:`pick_start` keeps one, never worse at the published size
  than a rotation (the published embedding).

- :class:`WarmHead` (``fit --init published``): one linear map of the standardised pooled
  vector, started at ``[R W; X] x + [R (b - m); c]``; the rows ``X`` of dims beyond the
  published size are the next PCA directions of the pooled vectors orthogonal to ``W``'s
  rows. The margin loss then trains all of it; the loop scores epoch 0 and keeps a later
  epoch only if no dim is worse (:func:`mrlcache.fit.loop.selection_ratio`); epoch 0 kept
  after held-out validation is fitted again on every training speaker (cache_mode).
- :class:`AdaptorHead` (``fit --objective adaptor | adaptor-supervised``): ``e`` stays fixed,
  the output is ``Q e + g(Q e)`` with ``Q`` a trainable orthogonal matrix
  (``torch.nn.utils.parametrizations.orthogonal``, started at the pca or lda rotation) and
  ``g`` an optional small residual MLP whose last layer starts at zero
  (``--adaptor-hidden``; 0: rotation only, and the full-size scores are the published ones
  at every step).

The adaptor's loss (:class:`AdaptorLoss`) follows Matryoshka-Adaptor (Yoon et al., EMNLP
2024): at each prefix ``d``, the cosine of every pair of the batch, and of each row's
``topk`` nearest neighbours (by the published embedding), should stay the published
embedding's cosine; the full size counts as one more prefix, which keeps a residual MLP
near the published geometry (the paper's reconstruction term, in score space). It needs
no speaker labels; ``adaptor-supervised`` adds the Matryoshka margin loss on top.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mrlcache.baselines import fit_lda
from mrlcache.models.adaptor import AdaptorHead, WarmHead
from mrlcache.models.matryoshka import check_dims

ROTATIONS = ("pca", "lda", "whitened")
CENTRED = "-centred"  # "pca-centred": the pca start of the centred embedding (= eer's pca baseline at every dim)


def auto_starts(center: bool) -> tuple[str, ...]:
    """The starts ``--init-rotation auto`` scores at epoch 0 (:func:`pick_start` keeps one): every
    rotation, and (without ``--init-center``) the PCA of the centred embedding too."""
    return ROTATIONS if center else ROTATIONS + ("pca" + CENTRED,)
OBJECTIVES = ("margin", "adaptor", "adaptor-supervised")
INITS = ("random", "published")
EXTRA_SCALE = 0.5  # std of an extra dim at the start, relative to the last published dim's


def affine_of(fn, in_dim: int) -> tuple[np.ndarray, np.ndarray]:
    """The affine map of an affine ``fn`` (B, in_dim) -> (B, E) by probing: (W (E, in_dim), b (E,)) float64.

    ``b = fn(0)``, ``W = fn(I) - b``, computed in float64 on a float64 copy of ``fn`` when it
    is a module, or of its module when it is a method like ``backbone.head`` (eval mode:
    BatchNorm uses its running statistics).
    """
    import copy

    owner = getattr(fn, "__self__", None)
    if isinstance(owner, nn.Module):  # a method such as backbone.head: probe a float64 copy of its module
        fn = getattr(copy.deepcopy(owner).double().eval(), fn.__name__)
    elif isinstance(fn, nn.Module):
        fn = copy.deepcopy(fn).double().eval()
    with torch.no_grad():
        b = fn(torch.zeros(1, in_dim, dtype=torch.float64))[0]
        # Identity rows in blocks: an ECAPA pools 6144 values, and eye(6144) is 300 MB.
        w = torch.cat([fn(torch.eye(in_dim, dtype=torch.float64)[lo:lo + 512]) - b
                       for lo in range(0, in_dim, 512)])
    return w.T.numpy().astype(np.float64), b.numpy().astype(np.float64)


def _pca(x: np.ndarray) -> np.ndarray:
    """(n, E) -> principal directions (E, E) by column, most variance first, signs fixed."""
    x = x - x.mean(0)
    values, vectors = np.linalg.eigh(x.T @ x)
    vectors = vectors[:, ::-1]
    return vectors * np.sign(vectors[np.abs(vectors).argmax(axis=0), np.arange(vectors.shape[1])])


def start_rotation(emb: np.ndarray, labels, kind: str) -> np.ndarray:
    """The orthogonal (E, E) matrix whose rows order the published dims: ``Q e`` is rotated ``e``.

    ``pca``: principal directions of ``emb`` (n, E). ``lda``: LDA directions with class
    ``labels`` (n,), orthonormalised in order (QR), so the first ``d`` rows span the first
    ``d`` LDA directions.
    """
    if kind == "pca":
        return np.ascontiguousarray(_pca(emb).T)
    if kind != "lda":
        raise ValueError(f"rotation {kind!r}: choose one of pca, lda")
    _, directions = fit_lda(emb, labels)
    q, r = np.linalg.qr(directions)
    q = q * np.sign(np.diag(r))  # keep each direction's sense
    return np.ascontiguousarray(q.T)


def start_transform(emb: np.ndarray, labels, kind: str, center: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The start's map of the published embedding ``e`` (n, E): ``R (e - m)``; returns (R (E, E), m (E,)).

    ``pca`` / ``lda``: ``R`` the orthogonal :func:`start_rotation` (full-size cosines are the
    published ones; ``m`` = 0, or the training mean with ``center`` or a ``-centred`` kind). ``whitened``: exactly the
    transform of ``eer --baseline lda`` (:func:`mrlcache.baselines.fit_lda` of ``emb``):
    ``R`` = the whitened LDA directions as rows, most discriminant first, ``m`` the mean, so
    every prefix scores as the LDA baseline does (the full size too: it is not a rotation).
    """
    if kind == "whitened":
        mean, directions = fit_lda(emb, labels)
        return np.ascontiguousarray(directions.T), mean
    if kind.endswith(CENTRED):  # an auto candidate: the rotation of the centred embedding
        kind, center = kind[: -len(CENTRED)], True
    mean = emb.mean(0) if center else np.zeros(emb.shape[1])
    return start_rotation(emb - mean, labels, kind), mean


def pick_start(eers: dict, guard: str | None, rotations=("pca", "lda")) -> str:
    """The start ``--init-rotation auto`` keeps, from the validation EERs {name: {dim: eer}} of each.

    ``rotations``: the starts that score exactly as the published embedding at full size (the
    rotations not centred; none with ``--init-center``). Admissible: those, and a start whose
    EER at ``guard`` (the published size) is no worse than the best of them there (so the
    published size never loses to the published embedding on the validation trials). Of those,
    the lowest mean over dims of EER / the best start's EER at that dim (a per-dim ratio:
    small dims, whose EERs are large, do not drown the others); ties keep the first.
    """
    names = list(eers)
    dims = list(eers[names[0]])
    base = [n for n in names if n in rotations]
    if guard is not None and base:
        floor = min(eers[n][guard] for n in base)
        names = [n for n in names if n in base or eers[n][guard] <= floor]
    best = {d: min(eers[n][d] for n in eers) for d in dims}
    return min(names, key=lambda n: np.mean([eers[n][d] / best[d] if best[d] > 0 else (1.0 if eers[n][d] == 0
                                             else np.inf) for d in dims]))


def _extra_rows(w: np.ndarray, centred: np.ndarray, k: int, seed: int) -> np.ndarray:
    """``k`` rows (k, P) orthogonal to the rows of ``w``: the top PCA directions of the pooled
    vectors with ``w``'s row space projected out (random directions once those run out),
    scaled to a std of EXTRA_SCALE x the smallest std of ``w``'s outputs."""
    basis, _ = np.linalg.qr(w.T)  # (P, E) orthonormal basis of the row space
    rest = centred - (centred @ basis) @ basis.T
    rows = rest if len(rest) <= 4096 else rest[np.random.default_rng(seed).choice(len(rest), 4096, replace=False)]
    _, sv, vt = np.linalg.svd(rows, full_matrices=False)
    directions = vt[sv > 1e-8 * max(sv.max(initial=0.0), 1e-30)][:k]
    if len(directions) < k:  # the data spans fewer directions: random ones, orthogonal to all
        g = np.random.default_rng(seed).standard_normal((k - len(directions), w.shape[1]))
        both = np.concatenate([basis, directions.T], axis=1)
        g = g - (g @ both) @ both.T
        directions = np.concatenate([directions, g / np.linalg.norm(g, axis=1, keepdims=True)])
    target = EXTRA_SCALE * (centred @ w.T).std(0).min()
    std = (centred @ directions.T).std(0)
    return directions * (target / np.maximum(std, 1e-12))[:, None]


def warm_map(weight: np.ndarray, bias: np.ndarray, rotation: np.ndarray, pooled: np.ndarray, max_dim: int,
             seed: int):
    """The start of a :class:`WarmHead`: (weight (max_dim, P), bias (max_dim,), shift (P,), scale (P,)).

    The rotated published map ``Q W x + Q b`` (its first ``max_dim`` rows when the dims stop
    below the published size), then :func:`_extra_rows` with a zero bias for dims beyond it;
    ``shift``/``scale``: the training vectors' mean and std (the head's standardisation).
    """
    p64 = np.asarray(pooled, np.float64)
    shift, scale = p64.mean(0), p64.std(0) + 1e-6
    w, b = (rotation @ weight)[:max_dim], (rotation @ bias)[:max_dim]
    extra = max_dim - len(w)
    if extra > 0:
        w = np.concatenate([w, _extra_rows(w, p64 - shift, extra, seed)])
        b = np.concatenate([b, -(w[-extra:] @ shift)])  # extra dims centred on the training mean
    return w, b, shift, scale


def pair_distortion(adapted: torch.Tensor, base: torch.Tensor, dims: Sequence[int], topk: int) -> torch.Tensor:
    """Per prefix ``d``: mean |cos of adapted[:, :d] - cos of base| over the batch's pairs, plus the
    same over each row's ``topk`` nearest neighbours by ``base``. (B, E), (B, E) -> (len(dims),)."""
    target = F.normalize(base.float(), dim=1)
    target = target @ target.T  # (B, B)
    n = len(target)
    off = ~torch.eye(n, dtype=torch.bool, device=target.device)
    k = min(topk, n - 1)
    near = target.masked_fill(~off, -2.0).topk(k, dim=1).indices if k > 0 else None  # (B, k)
    out = []
    for d in dims:
        a = F.normalize(adapted[:, :d].float(), dim=1)
        diff = (a @ a.T - target).abs()  # (B, B)
        term = diff[off].mean() if n > 1 else diff.sum() * 0
        if near is not None:
            term = term + diff.gather(1, near).mean()
        out.append(term)
    return torch.stack(out)


class AdaptorLoss(nn.Module):
    """Similarity preservation at every prefix (and the full size), optionally + the margin loss.

    Called as ``loss(joined, labels, classes)`` where ``joined`` (B, 2E) is the adapted
    embedding beside the published one (:func:`adaptor_embed`). Returns (total, per-dim
    losses, per-dim accuracies): accuracies are the margin loss's, zeros without it.
    """

    def __init__(self, dims: Sequence[int], embed_dim: int, margin_loss=None, topk: int = 10,
                 dim_weights: Sequence[float] | None = None):
        super().__init__()
        self.dims, self.embed_dim, self.topk = check_dims(dims, embed_dim), int(embed_dim), int(topk)
        self.margin_loss = margin_loss
        w = torch.tensor([1.0] * len(self.dims) if dim_weights is None else [float(v) for v in dim_weights])
        self.register_buffer("dim_weights", w / w.sum())
        self.num_classes = margin_loss.num_classes if margin_loss is not None else 2
        self.margin = 0.0

    def set_margin(self, margin: float) -> None:
        if self.margin_loss is not None:
            self.margin_loss.set_margin(margin)
            self.margin = self.margin_loss.margin

    def forward(self, joined: torch.Tensor, labels: torch.Tensor, classes: torch.Tensor | None = None):
        adapted, base = joined[:, : self.embed_dim], joined[:, self.embed_dim:]
        levels = list(self.dims) + ([self.embed_dim] if self.dims[-1] < self.embed_dim else [])
        dist = pair_distortion(adapted, base, levels, self.topk)
        per = dist[: len(self.dims)]
        total = (per * self.dim_weights).sum() + dist[-1] * (len(levels) > len(self.dims))
        acc = torch.zeros(len(self.dims), device=joined.device)
        if self.margin_loss is not None:
            margin_total, margin_per, acc = self.margin_loss(adapted[:, : self.dims[-1]], labels, classes)
            total, per = total + margin_total, per + margin_per
        return total, per.detach(), acc


def adaptor_embed(head: AdaptorHead):
    """The training forward of an adaptor fit: (B, P) -> (B, 2E), adapted beside published."""
    return lambda x: torch.cat([head(x), head.base(x)], dim=1)


@torch.no_grad()
def start_classifier(loss_fn, emb: torch.Tensor, labels: torch.Tensor) -> None:
    """Class centres of a margin loss set to the normalised class means of ``emb`` (B, D): a warm
    head starts with a classifier that agrees with it, so the first steps refine rather than undo."""
    if loss_fn.classifier != "shared":
        return
    d = loss_fn.weight.shape[1]
    means = torch.zeros(loss_fn.num_classes, d, dtype=torch.float64)
    means.index_add_(0, labels.cpu(), F.normalize(emb[:, :d].double().cpu(), dim=1))
    seen = means.norm(dim=1) > 0
    rows = F.normalize(means, dim=1).float().repeat_interleave(loss_fn.subcenters, dim=0)
    keep = seen.repeat_interleave(loss_fn.subcenters)
    loss_fn.weight[keep] = rows[keep].to(loss_fn.weight.device)


def start_maps(cfg, published, pooled: np.ndarray, labels: np.ndarray, kinds) -> dict:
    """{kind: :func:`warm_map` of the start ``kind``} for a :class:`WarmHead` of ``cfg.head.dims``, from the
    published map (W, b) and training vectors ``pooled`` (n, P) with classes ``labels`` (n,)."""
    weight, bias = published
    emb = np.asarray(pooled, np.float64) @ weight.T + bias  # (n, E)
    out = {}
    for kind in kinds:
        r, m = start_transform(emb, labels, kind, cfg.head.init_center)
        out[kind] = warm_map(weight, bias - m, r, pooled, cfg.head.dims[-1], cfg.run.seed)
    return out


def build_nested(cfg, pooled_dim: int, num_classes: int, published, pooled: np.ndarray, labels: np.ndarray,
                 device):
    """The head, loss and training forward of ``fit --init published`` or ``--objective adaptor*``.

    Args: published: the published affine map (W (E, P), b (E,)), see :func:`affine_of`;
    pooled (n, P), labels (n,): training vectors and their classes (the start, the
    standardisation, the extra dims and the classifier's start).
    Returns (head, loss, embed_of, guard_dim, choose): ``embed_of(head)`` is the training
    forward, (B, P) -> what the loss takes; ``guard_dim`` is the published size if it is a
    trained dim, else the largest trained dim below it; ``choose`` is None, or (``--init-rotation
    auto``) ``choose(score)``: scores every start (``score(head)`` -> {str(dim): EER} on the
    validation trials), keeps the one :func:`pick_start` picks and returns
    {"kept": name, "eer": {name: {str(dim): EER}}} (``choose(None, kept)`` sets that start).
    """
    from mrlcache.fit.heads import make_loss

    weight, bias = published
    embed_dim = len(weight)
    guard = max((d for d in cfg.head.dims if d <= embed_dim), default=None)
    auto = cfg.head.init_rotation == "auto"
    ordered = len(np.unique(labels)) - 1  # LDA has at most classes - 1 directions with between-class spread
    if cfg.head.init_rotation in ("lda", "whitened") and min(cfg.head.dims[-1], embed_dim) > ordered:
        import sys

        print(f"note: --init-rotation {cfg.head.init_rotation}: {ordered + 1} training speakers order only the first "
              f"{ordered} directions; dims past {ordered} start in no meaningful order (more speakers, or "
              "--init-rotation pca)", file=sys.stderr)
    torch.manual_seed(cfg.run.seed)
    x = torch.from_numpy(np.asarray(pooled, np.float32))
    if cfg.head.objective == "margin":
        maps = start_maps(cfg, published, pooled, labels, auto_starts(cfg.head.init_center) if auto else
                          (cfg.head.init_rotation,))
        head = WarmHead(pooled_dim, cfg.head.dims, embed_dim)
        head.set_map(*next(iter(maps.values())))
        loss = make_loss(cfg, num_classes)
        start_classifier(loss, head(x), torch.from_numpy(labels))
        head, loss = head.to(device), loss.to(device)

        def choose(score, kept: str | None = None):
            eers = {}
            if kept is None:  # (given: the pick of rank 0, applied on another rank)
                for kind, m in maps.items():
                    head.set_map(*m)
                    eers[kind] = score(head)
                kept = pick_start(eers, str(guard) if guard is not None else None,
                                  () if cfg.head.init_center else ("pca", "lda"))
            head.set_map(*maps[kept])
            with torch.no_grad():
                start_classifier(loss, head(x.to(device)), torch.from_numpy(labels))
            return {"kept": kept, "eer": eers}

        return head, loss, (lambda h: h), guard, (choose if len(maps) > 1 else None)
    if cfg.head.dims[-1] > embed_dim:
        raise ValueError(f"dims {list(cfg.head.dims)}: the adaptor rotates the published {embed_dim}-dim embedding; "
                         f"give dims up to {embed_dim} (or --init published for more)")
    if cfg.head.init_rotation == "whitened":
        raise ValueError("--init-rotation whitened is not a rotation: the adaptor keeps the published full-size "
                         "scores; use --init-rotation pca or lda (auto: pca) with --objective adaptor")
    emb = np.asarray(pooled, np.float64) @ weight.T + bias  # (n, E)
    rotation, mean = start_transform(emb, labels, "pca" if auto else cfg.head.init_rotation, cfg.head.init_center)
    head = AdaptorHead(pooled_dim, cfg.head.dims, embed_dim, cfg.head.adaptor_hidden)
    head.set_map(weight, bias - mean, rotation)
    margin = None
    if cfg.head.objective == "adaptor-supervised":
        margin = make_loss(cfg, num_classes)
        start_classifier(margin, torch.from_numpy(((emb - mean) @ rotation.T).astype(np.float32)),
                         torch.from_numpy(labels))
    loss = AdaptorLoss(cfg.head.dims, embed_dim, margin, cfg.head.adaptor_topk, cfg.loss.dim_weights)
    head, loss = head.to(device), loss.to(device)
    return head, loss, adaptor_embed, guard, None
