"""The input of graph families: one graph's tensors, from a torch_geometric ``Data`` or from the
PyG-style positional arguments ``(x, edge_index, edge_weight, context)`` that PyG / Captum tools pass.

A neutral module: the graph datamodule (zoo.data.graphs) builds the graph, X-Node (zoo.models.xnode)
consumes it, and the graph metrics (zoo.metrics.graphs) read it, none importing another for it.
Shapes: N nodes, F node features, E edges, C context cues.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

# The context cues of every node, in this order (zoo.data.graphs computes them; X-Node names them).
CONTEXT_NAMES: tuple[str, ...] = ("degree", "weighted_degree", "clustering", "pagerank", "saliency",
                                  "label_agreement")


class GraphInput:
    """x (N,F), edge_index (2,E) long, edge_weight (E,) or None, context (N,C) or None; ``extra`` holds
    the optional fields of a Data object (y_train, context_raw, images, class_names, train_mask,
    context_names)."""

    def __init__(self, x, edge_index=None, edge_weight=None, context=None, **extra: Any) -> None:
        if hasattr(x, "edge_index") and not isinstance(x, Tensor):  # a torch_geometric Data (duck-typed)
            data = x
            x, edge_index = data.x, data.edge_index
            edge_weight = getattr(data, "edge_weight", None) if edge_weight is None else edge_weight
            context = getattr(data, "context", None) if context is None else context
            for key in ("y_train", "context_raw", "images", "class_names", "train_mask", "context_names"):
                extra.setdefault(key, getattr(data, key, None))
        self.x, self.edge_index, self.edge_weight, self.context = x, edge_index, edge_weight, context
        self.extra = extra

    @property
    def num_nodes(self) -> int:
        return self.x.shape[0]
