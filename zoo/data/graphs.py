"""Images → one kNN graph (one node per image, all splits) as a datamodule, the input of graph
families (X-Node). The recipe — encoder features, kNN graph, context vector per node — is
:mod:`zoo.data.graph_build`; this module caches its result and serves it.

1. **Encoder.** An image model with ``.backbone`` + ``.head`` (``cnn`` / ``timm``), already trained:
   a saved zoo model folder / name or a module given as ``encoder=``, or — ``encoder=None`` — the
   zoo ``cnn`` of the recipe (``encoder_widths`` / ``_epochs`` / ``_lr`` / ``_batch_size``, train
   split only, no model selection on val/test), which the training code fits with Lightning and
   hands over with :meth:`GraphDataModule.attach_encoder` (``zoo.training.prepare_graph``) when the
   cache does not hold the graph. This module never trains. **Cross-fitting** (``folds`` = K ≥ 2, the
   default 5): K encoders, encoder f fitted on the training nodes outside fold f
   (:meth:`GraphDataModule.encoder_subsets`) and embedding every node (train, val, test) of fold f,
   so no node's cues come from an encoder that saw it (see :mod:`zoo.data.graph_build`); ``folds=1``
   is the single-encoder graph.
2. **Cache.** The graph is written to ``<cache_dir>/<key>/`` (safetensors + JSON, no
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
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from zoo import hub
from zoo.data.catalog import create_datamodule
from zoo.data.common import SPLITS, BaseDataModule, denormalize
from zoo.data.graph_build import (METRICS, build_graph, clustering_coefficient, context_vectors, embed,
                                  embedding_saliency, fold_assignment, knn_graph, neighbour_label_counts,
                                  pagerank, standardise)
from zoo.graph_input import CONTEXT_NAMES
from zoo.registry import create_model

log = logging.getLogger("zoo")

GRAPH_FILE, ENCODER_FILE, META_FILE = "graph.safetensors", "encoder{}.safetensors", "meta.json"


# ---------------------------------------------------------------------- helpers
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


def _sha(*parts: bytes | str) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode() if isinstance(p, str) else p)
    return h.hexdigest()


def _tensor_bytes(t: Tensor) -> bytes:
    return t.detach().cpu().contiguous().numpy().tobytes()



# ---------------------------------------------------------------------- datamodule
class _GraphSplit(Dataset):
    """One item: the whole graph with the split's mask and the split's labels (full-batch training)."""

    def __init__(self, data, mask: Tensor, labels: Tensor, repeats: int = 1) -> None:
        self.data, self.mask, self.labels, self.repeats = data, mask, labels, repeats

    def __len__(self) -> int:
        return self.repeats

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"graph": self.data, "mask": self.mask, "label": self.labels}


class GraphDataModule(BaseDataModule):
    """A kNN image graph over any zoo image datamodule (see the module docstring).

    Args:
        flag: dataset name for :func:`zoo.data.create_datamodule` (a MedMNIST flag or "synthetic");
            ignored when ``images`` (an image datamodule object) is given.
        root: MedMNIST folder (None: $ZOO_DATA_DIR or ~/.medmnist).
        image_kwargs: extra arguments of the image datamodule (e.g. ``train_subset``).
        encoder: trained image model(s) — a saved zoo model folder / name or the module itself; with
            folds ≥ 2 a list of K of them, ``encoder[f]`` not fitted on fold f's training nodes — or
            None: the recipe's zoo ``cnn`` (``encoder_*``), fitted per fold by the training code and
            handed over with :meth:`attach_encoder` where the cache does not hold the graph
            (``needs_encoder()``).
        folds: cross-fitting folds K over all nodes (1: no cross-fitting, one encoder for all).
        k, metric: kNN graph.
        cache_dir: where built graphs are cached (None: no cache).
        steps_per_epoch: full-batch optimiser steps per training epoch.
    Attributes after construction: num_classes, in_channels, image_size, task, class_names, name,
    num_node_features, context_names; after setup: ``graph`` (a torch_geometric Data).
    """

    input_kind = "graph"  # batches hold one whole graph, for models with input_kind "graph"

    def __init__(self, flag: str = "pneumoniamnist", root: str | None = None, images=None,
                 image_kwargs: dict | None = None, encoder: str | nn.Module | Sequence | None = None, k: int = 8,
                 metric: str = "cosine", encoder_widths: Sequence[int] = (32, 64, 128), encoder_epochs: int = 5,
                 encoder_lr: float = 3e-3, encoder_batch_size: int = 128, cache_dir: str | None = None,
                 seed: int = 0, chunk: int = 2048, steps_per_epoch: int = 25,
                 folds: int = 5) -> None:  # cross-fitting: K=5 keeps 80 % of the training nodes per encoder
        super().__init__(seed=seed)
        if folds < 1:
            raise ValueError(f"folds must be >= 1 (1 = no cross-fitting), got {folds}")
        given = None if encoder is None else list(encoder) if isinstance(encoder, (list, tuple)) else [encoder]
        if given is not None and len(given) != folds:
            raise ValueError(f"{len(given)} encoder(s) given for folds={folds}: cross-fitting needs one encoder per "
                             "fold (encoder=[...], encoder f not fitted on fold f); folds=1 embeds every node "
                             "with one encoder")
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
                       "encoder": None if given is None else [e if isinstance(e, str) else "given" for e in given],
                       "k": int(k), "metric": metric, "encoder_widths": list(encoder_widths),
                       "encoder_epochs": int(encoder_epochs), "encoder_lr": float(encoder_lr),
                       "encoder_batch_size": int(encoder_batch_size), "seed": int(seed), "folds": int(folds)}
        self.chunk = int(chunk)
        if steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
        self.steps_per_epoch = int(steps_per_epoch)
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.num_classes, self.in_channels = images.num_classes, images.in_channels
        self.image_size, self.task, self.class_names = images.image_size, images.task, list(images.class_names)
        self.name = images.name
        self.context_names = list(CONTEXT_NAMES)
        # A given encoder's weights enter the cache key; one trained from the recipe does not (the recipe is).
        self._encoders = None if given is None else [hub.load(e) if isinstance(e, str) else e for e in given]
        self._encoder_given = given is not None
        self._encoder_seconds = 0.0
        if self._encoders is not None:
            self.num_node_features = int(self._encoders[0].backbone.out_channels)
        else:
            self.num_node_features = int(list(encoder_widths)[-1])
        self._tensors: tuple[Tensor, Tensor, Tensor, Tensor] | None = None
        self.graph = None
        self.timings: dict[str, float] = {}
        self.cache_path: Path | None = None
        self._labels: Tensor | None = None

    # the model's size comes from the data: train() passes these to the model (see training.build_model)
    @property
    def model_kwargs(self) -> dict[str, Any]:
        return {"num_node_features": self.num_node_features, "context_dim": len(self.context_names)}

    def _key(self, images: Tensor, y_train: Tensor, split: Tensor) -> str:
        given = self._encoders if self._encoder_given else []
        enc = _sha(*[_tensor_bytes(v) for m in given for _, v in sorted(m.state_dict().items())])
        # "v2": cross-fitted layout (encoder<f>.safetensors); older cache folders are never read.
        return _sha("v2", json.dumps(self.recipe, sort_keys=True), enc, _tensor_bytes(images), _tensor_bytes(split),
                    _tensor_bytes(y_train))[:16]

    def _node_tensors(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(images (N,C,H,W) in [-1,1], labels (N,) — evaluation only —, y_train (N,) training labels
        and −1 elsewhere, split (N,) 0/1/2), every split in node order; read once."""
        if self._tensors is None:
            parts = _split_tensors(self.images)
            images = torch.cat([parts[s]["image"] for s in SPLITS])
            labels = torch.cat([parts[s]["label"] for s in SPLITS])
            split = torch.cat([torch.full((parts[s]["label"].shape[0],), i) for i, s in enumerate(SPLITS)])
            y_train = torch.where(split == 0, labels, torch.full_like(labels, -1))
            self._tensors = (images, labels, y_train, split)
        return self._tensors

    def _cache_folder(self) -> Path | None:
        if self.cache_dir is None:
            return None
        images, _, y_train, split = self._node_tensors()
        return self.cache_dir / f"{self.name}-{self._key(images, y_train, split)}"

    # ------------------------------------------------------------------ the encoder, from outside
    def needs_encoder(self) -> bool:
        """Whether setup() needs an encoder it does not have: none given or attached, and the graph
        not in the cache."""
        if self.graph is not None or self._encoders is not None:
            return False
        folder = self._cache_folder()
        return folder is None or not (folder / META_FILE).is_file()

    def train_split(self) -> tuple[Tensor, Tensor]:
        """(images (M,C,H,W) in [-1,1], labels (M,)) of the training nodes: all an encoder may learn from."""
        return self.images_of("train")

    def images_of(self, split: str) -> tuple[Tensor, Tensor]:
        """(images in [-1,1], labels) of one split's nodes, in node order (val/test labels: evaluation only)."""
        images, labels, _, split_ids = self._node_tensors()
        rows = split_ids == SPLITS.index(split)
        return images[rows], labels[rows]

    def encoder_subsets(self) -> list[Tensor]:
        """Boolean masks over the rows of :meth:`train_split`, one per encoder the recipe needs: the
        training nodes outside cross-fitting fold f (all of them when folds=1). The training code fits
        one encoder on each and hands them to :meth:`attach_encoder`."""
        _, _, y_train, split = self._node_tensors()
        fold = fold_assignment(split, self.recipe["folds"], self.recipe["seed"])[split == 0]
        if self.recipe["folds"] < 2:
            return [torch.ones_like(fold, dtype=torch.bool)]
        return [fold != f for f in range(self.recipe["folds"])]

    def attach_encoder(self, encoders: Sequence[nn.Module], seconds: float = 0.0) -> None:
        """Hand over the recipe's encoders, ``encoders[f]`` trained on ``encoder_subsets()[f]`` of
        :meth:`train_split` (``seconds``: their training time, kept in ``timings``). They do not enter
        the cache key: the recipe determines them."""
        if len(encoders) != self.recipe["folds"]:
            raise ValueError(f"folds={self.recipe['folds']}: attach_encoder needs {self.recipe['folds']} "
                             f"encoder(s), got {len(encoders)}")
        self._encoders = [e.eval() for e in encoders]
        self._encoder_seconds = float(seconds)

    def setup(self, stage: str | None = None) -> None:
        if self.graph is not None:
            return
        from torch_geometric.data import Data

        images, labels, y_train, split = self._node_tensors()
        train = split == 0
        built = self._load_or_build(images, y_train, split)
        x, _, _ = standardise(built["features"], train)
        context, _, _ = standardise(built["context_raw"], train)
        uint8 = (denormalize(images) * 255).round().to(torch.uint8)
        self.graph = Data(x=x, edge_index=built["edge_index"], edge_weight=built["edge_weight"], context=context,
                          fold=built["fold"],
                          context_raw=built["context_raw"], y_train=y_train, train_mask=train, val_mask=split == 1,
                          test_mask=split == 2, encoder_logits=built["encoder_logits"], images=uint8,
                          class_names=self.class_names, context_names=self.context_names)
        self._labels = labels

    def _load_or_build(self, images: Tensor, y_train: Tensor, split: Tensor) -> dict[str, Tensor]:
        folder, r = self._cache_folder(), self.recipe
        if folder is not None:
            self.cache_path = folder
            if (folder / META_FILE).is_file():
                tensors = load_file(folder / GRAPH_FILE)
                meta = json.loads((folder / META_FILE).read_text())
                self.timings = meta["timings"]
                if self._encoders is None:
                    self._encoders = [self._cached_encoder(folder / ENCODER_FILE.format(f), meta)
                                      for f in range(r["folds"])]
                log.info("graph loaded from cache %s", folder)
                return tensors
        if self._encoders is None:
            raise RuntimeError(f"graph of {self.name}: no encoder to embed the images with, and the graph is not "
                               f"cached — pass encoder=<a saved zoo model> or let the training code fit the "
                               f"recipe's cnn: zoo.training.prepare_graph(datamodule) before setup()")
        fold = fold_assignment(split, r["folds"], r["seed"])
        built = build_graph(images, y_train, split, self._encoders, fold, k=r["k"], metric=r["metric"],
                            chunk=self.chunk)
        self.timings = {"encoder_training": self._encoder_seconds, **built.pop("timings")}
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)
            save_file({k: v.contiguous() for k, v in built.items()}, folder / GRAPH_FILE)
            for f, enc in enumerate(self._encoders):
                save_file({k: v.contiguous() for k, v in enc.state_dict().items()}, folder / ENCODER_FILE.format(f))
            meta = {"recipe": r, "timings": self.timings, "encoder_model": self._encoders[0].model_name,
                    "encoder_hparams": hub.plain(dict(self._encoders[0].hparams)), "context_names": self.context_names}
            (folder / META_FILE).write_text(json.dumps(meta, indent=1))
        return built

    @staticmethod
    def _cached_encoder(path: Path, meta: dict) -> nn.Module:
        enc = create_model("cnn", **meta["encoder_hparams"])
        enc.load_state_dict(load_file(path))
        return enc.eval()

    # ------------------------------------------------------------------ access
    @property
    def encoders(self) -> list:
        """The image encoders that made the node features: ``[f]`` embeds fold f (``graph.fold``) and
        never saw fold f's training nodes; one encoder when folds=1."""
        self.setup()
        return self._encoders

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
        return {"cnn encoder (image CNN, train split, cross-fitted)": {
            "acc": float(torchmetrics.functional.accuracy(probs, y, **kw)),
            "auroc": float(torchmetrics.functional.auroc(probs, y, **kw))}}

    def export(self, folder: str | Path) -> Path:
        """Write the graph recipe next to a saved model: ``graph.yaml`` + the encoders as zoo folders
        (``encoder/``; with cross-fitting ``encoders/<f>/``). :meth:`from_saved` rebuilds the same
        graph from the images (the cache key makes it a no-op when cached).
        """
        import yaml

        folder = Path(folder)
        for path, enc in zip(_encoder_folders(folder, self.recipe["folds"]), self.encoders):
            hub.save(enc, path, data=self.name, notes="Image encoder of the X-Node graph (node features = pooled "
                     "backbone features); with cross-fitting it embeds the nodes of its fold, unseen by it.")
        recipe = {"flag": self.name, "image_kwargs": self.recipe["image_kwargs"], "k": self.recipe["k"],
                  "metric": self.recipe["metric"], "seed": self.recipe["seed"], "folds": self.recipe["folds"]}
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
            pretrained = hub.pretrained_root() / str(folder)
            folder = pretrained if pretrained.is_dir() else folder
        if not (folder / "graph.yaml").is_file():
            raise FileNotFoundError(f"no graph recipe (graph.yaml) in {folder}: not a saved graph model")
        recipe = yaml.safe_load((folder / "graph.yaml").read_text())
        recipe.setdefault("folds", 1)  # recipes saved before cross-fitting: one encoder for every node
        encoders = [str(p) for p in _encoder_folders(folder, recipe["folds"])]
        return cls(**{**recipe, "root": root, "encoder": encoders, **kwargs})


def _encoder_folders(folder: Path, folds: int) -> list[Path]:
    """Where a saved graph model keeps its encoder(s): ``encoder/`` (folds=1) or ``encoders/<f>/``."""
    return [folder / "encoder"] if folds < 2 else [folder / "encoders" / str(f) for f in range(folds)]


_RECIPE_NOTE = """
## Graph recipe

This model classifies nodes of a kNN image graph of {name} (k={k}, {metric}); `graph.yaml` and the
image encoder(s) in `encoder/` (cross-fitted: `encoders/<fold>/`) rebuild that graph from the images,
identically:

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
           "embed", "embedding_saliency", "fold_assignment", "knn_graph", "neighbour_label_counts", "pagerank",
           "standardise"]
