"""Images → one kNN graph (one node per image, all splits), the input of graph families (X-Node).

Recipe (every step is leak-free: only *training* labels are ever read before evaluation):

1. **Encoder.** A zoo ``cnn`` trained on the train split only, for a fixed number of epochs (no
   model selection on val/test), or any saved zoo model folder given as ``encoder=`` (``cnn`` /
   ``timm``: anything with ``.backbone`` + ``.head``). Node features = its pooled backbone features.
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
4. **Cache.** Everything above is written to ``<cache_dir>/<key>/`` (safetensors + JSON, no
   pickle), key = SHA-256 of the recipe, the encoder weights (when given) and the data actually
   read (images, split membership and *training* labels — so even the cache key cannot depend on
   val/test labels).

:class:`GraphDataModule` wraps any zoo image datamodule and yields the whole graph as one batch
per epoch (full-batch training): ``{"graph": Data, "mask": (N,) bool, "label": (M,) labels of the
split's nodes}``. The ``Data`` object carries ``y_train`` (training labels, −1 elsewhere) and never
the val/test labels.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any, Sequence

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from zoo.data.common import SPLITS, denormalize

log = logging.getLogger("zoo")

CONTEXT_NAMES: tuple[str, ...] = ("degree", "weighted_degree", "clustering", "pagerank", "saliency",
                                  "label_agreement")
METRICS = ("cosine", "euclidean")
GRAPH_FILE, ENCODER_FILE, META_FILE = "graph.safetensors", "encoder.safetensors", "meta.json"


# ---------------------------------------------------------------------- graph pieces (pure functions)
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


# ---------------------------------------------------------------------- encoder
def _split_tensors(images_dm) -> dict[str, dict[str, Tensor]]:
    """Full split tensors of an image datamodule: normalised float images (N,C,H,W) and labels."""
    out = {}
    for split in SPLITS:
        ds = images_dm.dataset(split)
        idx = ds.indices
        img = ds.tensors["image"][idx]
        if ds.image_transform is not None:
            img = ds.image_transform(img)
        out[split] = {"image": img.float(), "label": ds.tensors["label"][idx]}
    return out


def train_encoder(images: Tensor, labels: Tensor, num_classes: int, in_channels: int, image_size: int,
                  widths: Sequence[int] = (32, 64, 128), epochs: int = 5, lr: float = 3e-3,
                  batch_size: int = 128, seed: int = 0):
    """The zoo ``cnn`` trained on (train images, train labels) for a fixed number of epochs."""
    from zoo.registry import create_model

    torch.manual_seed(seed)
    model = create_model("cnn", num_classes=num_classes, in_channels=in_channels, image_size=image_size,
                         widths=list(widths), lr=lr)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs))
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(images.shape[0], generator=g)
        for start in range(0, images.shape[0], batch_size):
            sel = order[start:start + batch_size]
            loss, _, _ = model.loss({"image": images[sel], "label": labels[sel]})
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
    return model.eval()


@torch.no_grad()
def embed(encoder, images: Tensor, batch_size: int = 512) -> Tensor:
    """Pooled backbone features (N,D) of `images`, in eval mode, in batches."""
    encoder.eval()
    return torch.cat([encoder.backbone(images[i:i + batch_size]).mean(dim=(2, 3))
                      for i in range(0, images.shape[0], batch_size)])


def _sha(*parts: bytes | str) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode() if isinstance(p, str) else p)
    return h.hexdigest()


def _tensor_bytes(t: Tensor) -> bytes:
    return t.detach().cpu().contiguous().numpy().tobytes()


def build_graph(images: Tensor, labels: Tensor, split: Tensor, num_classes: int, encoder=None, k: int = 8,
                metric: str = "cosine", encoder_widths: Sequence[int] = (32, 64, 128), encoder_epochs: int = 5,
                encoder_lr: float = 3e-3, encoder_batch_size: int = 128, seed: int = 0,
                chunk: int = 2048) -> dict[str, Any]:
    """The graph tensors for `images` (N,C,H,W) normalised, `split` (N,) 0/1/2 = train/val/test.

    Only ``labels[split == 0]`` is read. Returns a dict of tensors (see GRAPH_KEYS) plus
    ``encoder`` (the model) and ``timings`` (seconds: encoder training, embedding, knn, context).
    """
    train = split == 0
    y_train = torch.full_like(labels, -1)
    y_train[train] = labels[train]  # the only labels this function may use
    timings = {}
    t0 = time.perf_counter()
    if encoder is None:
        encoder = train_encoder(images[train], labels[train], num_classes, images.shape[1], images.shape[-1],
                                encoder_widths, encoder_epochs, encoder_lr, encoder_batch_size, seed)
    timings["encoder_training"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    features = embed(encoder, images)  # (N,D)
    saliency, enc_logits = embedding_saliency(encoder.head, features)
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
            "encoder_logits": enc_logits, "encoder": encoder, "timings": timings}


def standardise(values: Tensor, train: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(z, mean, std) with train-node statistics (std 0 → 1 so a constant cue stays 0)."""
    mean = values[train].mean(0)
    std = values[train].std(0)
    std = torch.where(std > 1e-8, std, torch.ones_like(std))
    return (values - mean) / std, mean, std


# ---------------------------------------------------------------------- datamodule
class _GraphSplit(Dataset):
    """One item: the whole graph with the split's mask and the split's labels (full-batch training)."""

    def __init__(self, data, mask: Tensor, labels: Tensor, repeats: int = 1) -> None:
        self.data, self.mask, self.labels, self.repeats = data, mask, labels, repeats

    def __len__(self) -> int:
        return self.repeats

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"graph": self.data, "mask": self.mask, "label": self.labels}


class GraphDataModule(L.LightningDataModule):
    """A kNN image graph over any zoo image datamodule (see the module docstring).

    Args:
        flag: dataset name for :func:`zoo.data.create_datamodule` (a MedMNIST flag or "synthetic");
            ignored when ``images`` (an image datamodule object) is given.
        root: MedMNIST folder (None: $ZOO_DATA_DIR or ~/.medmnist).
        image_kwargs: extra arguments of the image datamodule (e.g. ``train_subset``).
        encoder: None (train a zoo ``cnn`` on the train split) or a saved zoo model folder / name.
        k, metric: kNN graph.
        cache_dir: where built graphs are cached (None: no cache).
        steps_per_epoch: full-batch optimiser steps per training epoch.
    Attributes after construction: num_classes, in_channels, image_size, task, class_names, name,
    num_node_features, context_names; after setup: ``graph`` (a torch_geometric Data).
    """

    def __init__(self, flag: str = "pneumoniamnist", root: str | None = None, images=None,
                 image_kwargs: dict | None = None, encoder: str | None = None, k: int = 8,
                 metric: str = "cosine", encoder_widths: Sequence[int] = (32, 64, 128), encoder_epochs: int = 5,
                 encoder_lr: float = 3e-3, encoder_batch_size: int = 128, cache_dir: str | None = None,
                 seed: int = 0, chunk: int = 2048, steps_per_epoch: int = 25) -> None:
        super().__init__()
        from zoo.data import create_datamodule

        if metric not in METRICS:
            raise ValueError(f"unknown kNN metric {metric!r}; expected one of {METRICS}")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if images is None:
            kwargs = dict(image_kwargs or {})
            if not flag.startswith("synthetic"):  # MedMNIST: the folder of its .npz files
                kwargs.setdefault("root", root)
            kwargs.setdefault("seed", seed)
            images = create_datamodule(flag, **kwargs)
        if images.task != "multiclass":
            raise ValueError(f"graph datasets support single-label tasks only; {images.name} is {images.task}")
        self.images = images
        self.recipe = {"data": images.name, "image_kwargs": {k_: v for k_, v in (image_kwargs or {}).items()
                                                             if k_ != "root"},
                       "encoder": encoder, "k": int(k), "metric": metric, "encoder_widths": list(encoder_widths),
                       "encoder_epochs": int(encoder_epochs), "encoder_lr": float(encoder_lr),
                       "encoder_batch_size": int(encoder_batch_size), "seed": int(seed)}
        self.chunk = int(chunk)
        if steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
        self.steps_per_epoch = int(steps_per_epoch)
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.num_classes, self.in_channels = images.num_classes, images.in_channels
        self.image_size, self.task, self.class_names = images.image_size, images.task, list(images.class_names)
        self.name = images.name
        self.context_names = list(CONTEXT_NAMES)
        self._encoder = None
        if encoder is not None:
            from zoo.hub import load

            self._encoder = load(encoder)
            self.num_node_features = int(self._encoder.backbone.out_channels)
        else:
            self.num_node_features = int(list(encoder_widths)[-1])
        self.graph = None
        self.timings: dict[str, float] = {}
        self.cache_path: Path | None = None
        self._labels: Tensor | None = None

    # the model's size comes from the data: train() passes these to the model (see training.build_model)
    @property
    def model_kwargs(self) -> dict[str, Any]:
        return {"num_node_features": self.num_node_features, "context_dim": len(self.context_names)}

    def _key(self, images: Tensor, y_train: Tensor, split: Tensor) -> str:
        enc = _sha(*[_tensor_bytes(v) for _, v in sorted(self._encoder.state_dict().items())]) if self._encoder else ""
        return _sha(json.dumps(self.recipe, sort_keys=True), enc, _tensor_bytes(images), _tensor_bytes(split),
                    _tensor_bytes(y_train))[:16]

    def setup(self, stage: str | None = None) -> None:
        if self.graph is not None:
            return
        from torch_geometric.data import Data

        parts = _split_tensors(self.images)
        images = torch.cat([parts[s]["image"] for s in SPLITS])  # (N,C,H,W) in [-1,1]
        labels = torch.cat([parts[s]["label"] for s in SPLITS])  # (N,) all labels: evaluation only
        split = torch.cat([torch.full((parts[s]["label"].shape[0],), i) for i, s in enumerate(SPLITS)])
        train = split == 0
        y_train = torch.where(train, labels, torch.full_like(labels, -1))
        built = self._load_or_build(images, y_train, split)
        x, _, _ = standardise(built["features"], train)
        context, _, _ = standardise(built["context_raw"], train)
        uint8 = (denormalize(images) * 255).round().to(torch.uint8)
        self.graph = Data(x=x, edge_index=built["edge_index"], edge_weight=built["edge_weight"], context=context,
                          context_raw=built["context_raw"], y_train=y_train, train_mask=train, val_mask=split == 1,
                          test_mask=split == 2, encoder_logits=built["encoder_logits"], images=uint8,
                          class_names=self.class_names, context_names=self.context_names)
        self._labels = labels

    def _load_or_build(self, images: Tensor, y_train: Tensor, split: Tensor) -> dict[str, Tensor]:
        from zoo.registry import create_model

        folder = None
        if self.cache_dir is not None:
            folder = self.cache_dir / f"{self.name}-{self._key(images, y_train, split)}"
            self.cache_path = folder
            if (folder / META_FILE).is_file():
                tensors = load_file(folder / GRAPH_FILE)
                meta = json.loads((folder / META_FILE).read_text())
                self.timings = meta["timings"]
                enc = create_model("cnn", **meta["encoder_hparams"]) if self._encoder is None else self._encoder
                if self._encoder is None:
                    enc.load_state_dict(load_file(folder / ENCODER_FILE))
                self._encoder = enc.eval()
                log.info("graph loaded from cache %s", folder)
                return tensors
        r = self.recipe
        built = build_graph(images, y_train, split, self.num_classes, encoder=self._encoder, k=r["k"],
                            metric=r["metric"], encoder_widths=r["encoder_widths"],
                            encoder_epochs=r["encoder_epochs"], encoder_lr=r["encoder_lr"],
                            encoder_batch_size=r["encoder_batch_size"], seed=r["seed"], chunk=self.chunk)
        self._encoder = built.pop("encoder")
        self.timings = built.pop("timings")
        if folder is not None:
            from zoo.hub import plain

            folder.mkdir(parents=True, exist_ok=True)
            save_file({k: v.contiguous() for k, v in built.items()}, folder / GRAPH_FILE)
            save_file({k: v.contiguous() for k, v in self._encoder.state_dict().items()}, folder / ENCODER_FILE)
            meta = {"recipe": r, "timings": self.timings, "encoder_model": self._encoder.model_name,
                    "encoder_hparams": plain(dict(self._encoder.hparams)), "context_names": self.context_names}
            (folder / META_FILE).write_text(json.dumps(meta, indent=1))
        return built

    # ------------------------------------------------------------------ access
    @property
    def encoder(self):
        """The image encoder that made the node features (trained on the train split, or given)."""
        self.setup()
        return self._encoder

    def labels(self, split: str | None = None) -> Tensor:
        """True labels (evaluation only): of every node, or of one split's nodes in node order."""
        self.setup()
        return self._labels if split is None else self._labels[self.mask(split)]

    def mask(self, split: str) -> Tensor:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {list(SPLITS)}")
        self.setup()
        return getattr(self.graph, f"{split}_mask")

    def dataset(self, split: str) -> Dataset:
        mask = self.mask(split)
        # One training "epoch" = steps_per_epoch full-batch steps, so the trainer's epoch-based
        # defaults (6 epochs, cosine per epoch) give a full-batch GNN a sensible number of steps.
        return _GraphSplit(self.graph, mask, self._labels[mask], self.steps_per_epoch if split == "train" else 1)

    @staticmethod
    def denormalize(x: Tensor) -> Tensor:
        return denormalize(x)

    def _loader(self, split: str) -> DataLoader:
        # batch_size=None: the single item is the batch (no collation of the graph).
        return DataLoader(self.dataset(split), batch_size=None, shuffle=False)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    # ------------------------------------------------------------------ reporting / export
    def reference_rows(self) -> dict[str, dict[str, float]]:
        """Test accuracy/AUROC of the image CNN that made the node features (the zoo's image CNN row)."""
        import torchmetrics

        mask = self.mask("test")
        probs = self.graph.encoder_logits[mask].softmax(1)
        kw = dict(task="multiclass", num_classes=self.num_classes)
        y = self._labels[mask]
        return {"cnn encoder (image CNN, train split)": {
            "acc": float(torchmetrics.functional.accuracy(probs, y, **kw)),
            "auroc": float(torchmetrics.functional.auroc(probs, y, **kw))}}

    def export(self, folder: str | Path) -> Path:
        """Write the graph recipe next to a saved model: ``graph.yaml`` + the encoder as a zoo folder.

        ``GraphDataModule(**yaml.safe_load(open('graph.yaml')), encoder='<folder>/encoder')``
        rebuilds the same graph from the images (the cache key makes it a no-op when cached).
        """
        import yaml

        from zoo.hub import save

        folder = Path(folder)
        save(self.encoder, folder / "encoder", data=self.name,
             notes="Image encoder of the X-Node graph (node features = pooled backbone features).")
        recipe = {"flag": self.name, "image_kwargs": self.recipe["image_kwargs"], "k": self.recipe["k"],
                  "metric": self.recipe["metric"], "seed": self.recipe["seed"]}
        (folder / "graph.yaml").write_text(
            "# Graph recipe of this model: GraphDataModule.from_saved(<this folder>, root=<medmnist dir>)\n"
            + yaml.safe_dump(recipe, sort_keys=False))
        card = folder / "card.md"
        if card.is_file() and "## Graph recipe" not in card.read_text():
            card.write_text(card.read_text() + _RECIPE_NOTE.format(name=self.name, k=recipe["k"],
                                                                    metric=recipe["metric"]))
        return folder

    @classmethod
    def from_saved(cls, folder: str | Path, root: str | None = None, **kwargs: Any) -> "GraphDataModule":
        """The graph a saved graph model was trained on: its graph.yaml recipe + its encoder folder."""
        import yaml

        folder = Path(folder)
        if not (folder / "graph.yaml").is_file():
            from zoo.hub import pretrained_root

            folder = pretrained_root() / str(folder) if (pretrained_root() / str(folder)).is_dir() else folder
        if not (folder / "graph.yaml").is_file():
            raise FileNotFoundError(f"no graph recipe (graph.yaml) in {folder}: not a saved graph model")
        recipe = yaml.safe_load((folder / "graph.yaml").read_text())
        return cls(**{**recipe, "root": root, "encoder": str(folder / "encoder"), **kwargs})


_RECIPE_NOTE = """
## Graph recipe

This model classifies nodes of a kNN image graph of {name} (k={k}, {metric}); `graph.yaml` and the
image encoder in `encoder/` rebuild that graph from the images, identically:

```python
import zoo
from zoo.data import GraphDataModule

model = zoo.load("<this folder or name>")
dm = GraphDataModule.from_saved("<this folder or name>", root="<folder with {name}.npz>")
dm.setup()
expl = model.explain(dm.graph, nodes=dm.graph.test_mask.nonzero().squeeze(1)[:4])
print(expl.node_text[0]); expl.plot("nodes.png")
```
"""


__all__ = ["CONTEXT_NAMES", "GraphDataModule", "build_graph", "clustering_coefficient", "context_vectors",
           "embed", "embedding_saliency", "knn_graph", "neighbour_label_counts", "pagerank", "standardise",
           "train_encoder"]
