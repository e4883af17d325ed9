"""Images → one kNN graph (one node per image, all splits): the recipe, as pure functions.

Every step is leak-free: only *training* labels are ever read before evaluation.

1. **Encoder.** An image model with ``.backbone`` + ``.head`` (``cnn`` / ``timm``), already trained:
   a saved zoo model folder / name or a module given as ``encoder=``, or — ``encoder=None`` — the
   zoo ``cnn`` of the recipe (``encoder_widths`` / ``_epochs`` / ``_lr`` / ``_batch_size``, train
   split only, no model selection on val/test), which the training code fits with Lightning and
   hands over with :meth:`GraphDataModule.attach_encoder` (``zoo.training.prepare_graph``) when the
   cache does not hold the graph. This module never trains. Node features = pooled backbone features.
   **Cross-fitting** (``folds`` K ≥ 2, :func:`fold_assignment`): every node — training, val and
   test — falls into one of K folds (a seeded shuffle within each split, reading no label); encoder f
   is fitted on the training nodes *outside* fold f and embeds every node of fold f. So each node's features, saliency and encoder prediction (hence label
   agreement) come from an encoder that never saw it, and training and test cues are draws from one
   distribution (one encoder fitted on every training node scores 0.994 on them vs 0.872 on test:
   cues that mean different things on training and test nodes; embedding val/test with an all-data
   encoder instead puts them in another feature basis than the training nodes, which cost 5–30
   accuracy points on the tests' small graphs). Every encoder starts from the same seeded
   initialisation. ``folds=1``: one encoder, fitted on all training nodes, embeds every node.
2. **kNN graph.** Cosine (or Euclidean) k nearest neighbours, computed in chunks with
   ``torch.cdist``/matmul + ``topk`` (no Python loop over nodes), symmetrised with PyG's
   ``to_undirected`` (an edge exists if either end picked the other), edge weight = similarity.
3. **Context vector** per node, in :data:`CONTEXT_NAMES` order (names kept, standardised with
   train-node statistics):
   ``degree`` (neighbours), ``weighted_degree`` (sum of similarities), ``clustering`` (local
   clustering coefficient), ``pagerank`` (weighted PageRank; teleportation makes it well defined
   on disconnected graphs), ``saliency`` (gradient × input of the encoder's predicted-class
   log-probability w.r.t. the node embedding, L1 — the encoder's own gradients: how strongly the
   node's own features push its prediction), ``label_agreement`` (fraction of the node's
   *training-labelled* neighbours whose label equals the encoder's prediction for the node; 1/K
   when it has none — the node's own label is never used, for any split).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

METRICS = ("cosine", "euclidean")


def knn_graph(features: Tensor, k: int = 8, metric: str = "cosine", chunk: int = 2048) -> tuple[Tensor, Tensor]:
    """Symmetric kNN graph of `features` (N,D): edge_index (2,E) long and similarity weights (E,).

    Chunks of `chunk` query rows bound memory at O(chunk·N). Cosine similarity is clamped at 0 (ReLU
    features give cos ≥ 0 anyway) so that GCN degree normalisation stays well defined; Euclidean
    distances d become similarities 1/(1+d).
    """
    from torch_geometric.utils import to_undirected

    if metric not in METRICS:
        raise ValueError(f"unknown kNN metric {metric!r}; expected one of {METRICS}")
    n = features.shape[0]
    if not 1 <= k < n:
        raise ValueError(f"k must be in 1..{n - 1} for {n} nodes, got {k}")
    feats = F.normalize(features.float(), dim=1) if metric == "cosine" else features.float()
    cols, sims = [], []
    for start in range(0, n, chunk):
        q = feats[start:start + chunk]  # (c,D)
        if metric == "cosine":
            sim = q @ feats.T  # (c,N)
        else:
            sim = 1.0 / (1.0 + torch.cdist(q, feats))  # (c,N) larger = closer
        rows = torch.arange(start, start + q.shape[0])
        sim[rows - start, rows] = float("-inf")  # never your own neighbour
        top, idx = sim.topk(k, dim=1)  # (c,k)
        cols.append(idx)
        sims.append(top.clamp_min(0.0))
    col = torch.cat(cols).reshape(-1)  # (N·k,)
    row = torch.arange(n).repeat_interleave(k)
    weight = torch.cat(sims).reshape(-1)
    # Both directions; a pair picked by both ends keeps one edge (similarity is symmetric: max == it).
    edge_index, edge_weight = to_undirected(torch.stack([row, col]), weight, num_nodes=n, reduce="max")
    return edge_index, edge_weight


def _scipy_adjacency(edge_index: Tensor, n: int, weight: Tensor | None = None):
    import scipy.sparse as sp

    values = np.ones(edge_index.shape[1]) if weight is None else weight.double().numpy()
    return sp.csr_matrix((values, (edge_index[0].numpy(), edge_index[1].numpy())), shape=(n, n))


def clustering_coefficient(edge_index: Tensor, n: int) -> Tensor:
    """Local (unweighted) clustering coefficient (N,): triangles / (d(d−1)/2), 0 where d < 2.

    scipy's sparse product counts triangles as ((A·A) ∘ A)·1 / 2 without densifying A.
    """
    a = _scipy_adjacency(edge_index, n)
    triangles = np.asarray((a @ a).multiply(a).sum(axis=1)).ravel() / 2.0
    deg = np.asarray(a.sum(axis=1)).ravel()
    pairs = deg * (deg - 1) / 2.0
    cc = np.divide(triangles, pairs, out=np.zeros_like(triangles), where=pairs > 0)
    return torch.from_numpy(cc).float()


def pagerank(edge_index: Tensor, n: int, weight: Tensor | None = None, damping: float = 0.85,
             tol: float = 1e-10, max_iter: int = 200) -> Tensor:
    """Weighted PageRank (N,) summing to 1, by power iteration on a sparse transition matrix.

    Teleportation (1−damping) makes it defined on disconnected graphs; dangling nodes teleport
    uniformly. Same definition as networkx.pagerank (checked in the tests).
    """
    a = _scipy_adjacency(edge_index, n, weight)
    out = np.asarray(a.sum(axis=1)).ravel()
    inv = np.divide(1.0, out, out=np.zeros_like(out), where=out > 0)
    import scipy.sparse as sp

    transition_t = (sp.diags(inv) @ a).T.tocsr()  # column-stochastic
    dangling = out == 0
    p = np.full(n, 1.0 / n)
    for _ in range(max_iter):
        new = damping * (transition_t @ p + p[dangling].sum() / n) + (1 - damping) / n
        if np.abs(new - p).sum() < tol * n:
            p = new
            break
        p = new
    return torch.from_numpy(p / p.sum()).float()


def neighbour_label_counts(edge_index: Tensor, y_train: Tensor, num_classes: int) -> Tensor:
    """(N,K) number of each node's neighbours with *training* label k (unlabelled neighbours: −1, ignored)."""
    n = y_train.shape[0]
    src, dst = edge_index
    lab = y_train[src]
    keep = lab >= 0
    counts = torch.zeros(n, num_classes)
    counts.index_put_((dst[keep], lab[keep]), torch.ones(int(keep.sum())), accumulate=True)
    return counts


def embedding_saliency(head: torch.nn.Module, features: Tensor) -> tuple[Tensor, Tensor]:
    """(saliency (N,), logits (N,K)): L1 norm of gradient × input of the predicted class's
    log-probability w.r.t. the embedding, through the encoder's own head."""
    h = features.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        logits = head(h)
        logp = logits.log_softmax(dim=1)
        chosen = logp.gather(1, logits.argmax(1, keepdim=True)).sum()
        (grad,) = torch.autograd.grad(chosen, h)
    return (grad * h).abs().sum(dim=1).detach(), logits.detach()


def context_vectors(edge_index: Tensor, edge_weight: Tensor, y_train: Tensor, encoder_logits: Tensor,
                    saliency: Tensor) -> Tensor:
    """Raw context (N, len(CONTEXT_NAMES)) in CONTEXT_NAMES order; reads only training labels."""
    n, k = encoder_logits.shape
    deg = torch.bincount(edge_index[1], minlength=n).float()
    wdeg = torch.zeros(n).index_add_(0, edge_index[1], edge_weight.float())
    counts = neighbour_label_counts(edge_index, y_train, k)  # (N,K)
    labelled = counts.sum(1)
    pred = encoder_logits.argmax(1)
    agree = torch.where(labelled > 0, counts.gather(1, pred[:, None]).squeeze(1) / labelled.clamp_min(1),
                        torch.full((n,), 1.0 / k))
    return torch.stack([deg, wdeg, clustering_coefficient(edge_index, n), pagerank(edge_index, n, edge_weight),
                        saliency, agree], dim=1)


@torch.no_grad()
def embed(encoder, images: Tensor, batch_size: int = 512) -> Tensor:
    """Pooled backbone features (N,D) of `images`, in eval mode, in batches."""
    encoder.eval()
    return torch.cat([encoder.backbone(images[i:i + batch_size]).mean(dim=(2, 3))
                      for i in range(0, images.shape[0], batch_size)])


def fold_assignment(split: Tensor, folds: int, seed: int = 0) -> Tensor:
    """(N,) long: every node's cross-fitting fold 0..folds−1, dealt round-robin within each split after
    a seeded shuffle (so every fold holds ~1/K of each split); all 0 when folds < 2. No label is read:
    changing a fold's training labels cannot move any node between folds (the leakage test relies on it)."""
    fold = torch.zeros_like(split, dtype=torch.long)
    if folds < 2:
        return fold
    g = torch.Generator().manual_seed(seed)
    for s in split.unique():
        rows = (split == s).nonzero().squeeze(1)
        if s == 0 and len(rows) < folds:
            raise ValueError(f"cross-fitting with {folds} folds needs at least {folds} training nodes, got "
                             f"{len(rows)} — lower `folds` (1 = no cross-fitting)")
        fold[rows[torch.randperm(len(rows), generator=g)]] = torch.arange(len(rows)) % folds
    return fold


def encoder_outputs(encoder: nn.Module, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(features (N,D), saliency (N,), logits (N,K)) of `images` under one encoder."""
    features = embed(encoder, images)
    saliency, logits = embedding_saliency(encoder.head, features)
    return features, saliency, logits


def build_graph(images: Tensor, labels: Tensor, split: Tensor, encoders: list[nn.Module], fold: Tensor | None = None,
                k: int = 8, metric: str = "cosine", chunk: int = 2048) -> dict[str, Any]:
    """The graph tensors for `images` (N,C,H,W) normalised, `split` (N,) 0/1/2 = train/val/test, with
    trained `encoders` (``.backbone`` + ``.head``): node i is embedded by ``encoders[fold[i]]``
    (cross-fitting, :func:`fold_assignment`: encoder f must not have seen fold f's training nodes);
    ``fold=None``: one encoder for every node.

    Only ``labels[split == 0]`` is read. Returns a dict of tensors (features, edge_index, edge_weight,
    context_raw, encoder_logits, fold) plus ``timings`` (seconds: embedding, knn, context).
    """
    train = split == 0
    y_train = torch.full_like(labels, -1)
    y_train[train] = labels[train]  # the only labels this function may use
    fold = torch.zeros_like(split, dtype=torch.long) if fold is None else fold
    if int(fold.max()) >= len(encoders) or int(fold.min()) < 0:
        raise ValueError(f"fold holds folds {int(fold.min())}..{int(fold.max())} but {len(encoders)} encoders "
                         "were given")
    timings = {}
    t0 = time.perf_counter()
    rows = [fold == f for f in range(len(encoders))]
    outputs = [encoder_outputs(enc, images[r]) for enc, r in zip(encoders, rows)]  # (n_f,D), (n_f,), (n_f,K)
    features, saliency, enc_logits = (torch.empty(images.shape[0], *outputs[0][j].shape[1:]) for j in range(3))
    for r, (feat, sal, logit) in zip(rows, outputs):  # back in node order
        features[r], saliency[r], enc_logits[r] = feat, sal, logit
    timings["embedding"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    # Neighbours in the train-standardised feature space: raw pooled ReLU features all share one
    # dominant direction (every cosine ≈ 0.99); centring makes similarities discriminative.
    edge_index, edge_weight = knn_graph(standardise(features, train)[0], k, metric, chunk)
    timings["knn"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    context = context_vectors(edge_index, edge_weight, y_train, enc_logits, saliency)
    timings["context"] = time.perf_counter() - t0
    return {"features": features, "edge_index": edge_index, "edge_weight": edge_weight, "context_raw": context,
            "encoder_logits": enc_logits, "fold": fold, "timings": timings}


def standardise(values: Tensor, train: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(z, mean, std) with train-node statistics (std 0 → 1 so a constant cue stays 0)."""
    mean = values[train].mean(0)
    std = values[train].std(0)
    std = torch.where(std > 1e-8, std, torch.ones_like(std))
    return (values - mean) / std, mean, std


__all__ = ["METRICS", "build_graph", "clustering_coefficient", "context_vectors", "embed", "embedding_saliency",
           "encoder_outputs", "fold_assignment", "knn_graph", "neighbour_label_counts", "pagerank", "standardise"]
