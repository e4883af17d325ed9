"""X-Node: a GNN whose nodes explain themselves (Sengupta & Rekik, "X-Node: Who Should I Explain?"
— the paper's design; reference code basiralab/X-Node, whose leaks we do not copy: labels of
training nodes only, symmetric kNN, the official splits, a real reconstruction target, injection
inside every message-passing layer, offline text).

Graph: one node per image (zoo.data.graphs: kNN over CNN embeddings, leak-free context vectors).
Per node i with context vector c_i (degree, weighted degree, clustering, PageRank, saliency,
label agreement — standardised):

    e_i  = Reasoner(c_i)                       # MLP C→64→32: the explanation vector
    h^l  = act(Conv_l([h^{l-1} ‖ e], A, w))    # e injected into EVERY message-passing layer,
                                               # so neighbours' explanations travel with messages
    logits_i = Linear(h^L_i)
    ĥ_i  = Decoder(e_i) ≈ sg(h^L_i)            # faithfulness: e must carry the node's own latent

Loss (train-mask nodes only): CE + recon_weight · MSE(ĥ, stop-grad(h^L)). Backbones: GCN, GAT, GIN
(torch-geometric). ``gnn`` is the same network without context, reasoner, decoder or injection —
the "same GNN without X-Node" control.

Explanation (kind "node-context"): the context vector, the explanation vector, the decoder's
per-node R², context ablation (change in the explained class's probability when each standardised
cue is set to its training mean, 0, for every node), the training-labelled neighbours, and offline
text (text.py): template sentences each stating numbers that :func:`check_text` recomputes from the
model and the graph. Edges: ``extras["edge_gradient"]`` (E,) is the gradient of the explained logit(s)
w.r.t. a multiplicative mask on every edge's message, at mask 1 (:meth:`GNN.edge_attribution`: PyG's
own edge-mask hook, the one its fidelity metric removes edges with), and ``extras["edge_mask"]``
(float32, for torch_geometric.explain metrics) marks the edges whose gradient is positive — the
edges that raise the explained logit in the model's own computation.

Inputs: a torch_geometric ``Data`` (x, edge_index, edge_weight, context, optional y_train,
context_raw, images, class_names, train_mask) or the tensors ``forward(x, edge_index, edge_weight,
context)`` — the call PyG / Captum tools make (:class:`zoo.graph_input.GraphInput` reads both).
``forward`` returns plain logits (N,K) for every node. The family's table rows: report.py.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zoo.base import SelfExplainingModule
from zoo.explanation import Explanation
from zoo.graph_input import CONTEXT_NAMES, GraphInput
from zoo.metrics.graphs import ablated_probabilities
from zoo.registry import register_model

from .report import graph_rows
from .text import describe

BACKBONES = ("gcn", "gat", "gin")


@register_model("gnn")
class GNN(SelfExplainingModule):
    """A plain GCN / GAT / GIN node classifier over image graphs (the control without X-Node)."""

    input_kind = "graph"
    explanation_kind = "post-hoc"
    uses_context = False

    # node-feature and context sizes come from the graph datamodule (model_kwargs), like num_classes
    data_hparams = SelfExplainingModule.data_hparams + ("num_node_features", "context_dim")

    def __init__(self, backbone: str = "gcn", num_node_features: int = 128, context_dim: int = 6,
                 hidden: int = 64,  # paper: 2 layers, hidden 64
                 layers: int = 2,
                 heads: int = 4,  # GAT only
                 dropout: float = 0.5,  # standard for full-batch GNNs on small graphs
                 lr: float = 1e-2,  # full-batch GNN: few large steps (Kipf & Welling's GCN: 0.01)
                 weight_decay: float = 5e-4,  # Kipf & Welling's GCN setting
                 **base) -> None:
        super().__init__(lr=lr, weight_decay=weight_decay, **base)
        if backbone not in BACKBONES:
            raise ValueError(f"unknown GNN backbone {backbone!r}; expected one of {BACKBONES}")
        if layers < 1:
            raise ValueError(f"layers must be >= 1, got {layers}")
        if backbone == "gat" and hidden % heads:
            raise ValueError(f"GAT: hidden ({hidden}) must be divisible by heads ({heads})")
        self.backbone, self.dropout = backbone, dropout
        self.num_node_features, self.context_dim = num_node_features, context_dim
        inject = self._injected_dim()
        dims = [num_node_features] + [hidden] * layers
        self.convs = nn.ModuleList(self._conv(dims[i] + inject, dims[i + 1]) for i in range(layers))
        self.classifier = nn.Linear(hidden, self.num_classes)

    def _injected_dim(self) -> int:
        return 0

    def _conv(self, d_in: int, d_out: int) -> nn.Module:
        from torch_geometric.nn import GATConv, GCNConv, GINConv

        if self.backbone == "gcn":
            return GCNConv(d_in, d_out)  # symmetric normalisation with edge weights, self-loops
        if self.backbone == "gat":
            heads = self.hparams.heads  # edge similarity enters the attention as a 1-d edge feature
            return GATConv(d_in, d_out // heads, heads=heads, edge_dim=1)
        # GIN aggregates by sum and takes no edge weights (injective aggregation is its point).
        return GINConv(nn.Sequential(nn.Linear(d_in, d_out), nn.ReLU(), nn.Linear(d_out, d_out)), train_eps=True)

    def _apply_conv(self, conv: nn.Module, h: Tensor, g: GraphInput) -> Tensor:
        if self.backbone == "gcn":
            return conv(h, g.edge_index, g.edge_weight)
        if self.backbone == "gat":
            attr = None if g.edge_weight is None else g.edge_weight.view(-1, 1)
            return conv(h, g.edge_index, edge_attr=attr)
        return conv(h, g.edge_index)

    # ------------------------------------------------------------------ input
    def example_input(self, batch_size: int = 2):
        """A valid small graph: `batch_size` nodes on a ring, random features and context."""
        from torch_geometric.data import Data

        n = max(2, batch_size)
        src = torch.arange(n)
        dst = (src + 1) % n
        edge_index = torch.stack([torch.cat([src, dst]), torch.cat([dst, src])])
        g = torch.Generator().manual_seed(0)
        context_raw = torch.rand(n, self.context_dim, generator=g)
        return Data(x=torch.randn(n, self.num_node_features, generator=g), edge_index=edge_index,
                    edge_weight=torch.ones(edge_index.shape[1]), context=torch.randn(n, self.context_dim, generator=g),
                    context_raw=context_raw, y_train=torch.tensor([0] + [-1] * (n - 1)),
                    train_mask=torch.tensor([True] + [False] * (n - 1))).to(self.device)

    def validate_graph(self, g: GraphInput) -> None:
        """One clear error naming the problem with a graph input."""
        name = self.model_name
        if not isinstance(g.x, Tensor) or g.x.ndim != 2:
            raise ValueError(f"{name}: expected node features x of shape (N,F), got "
                             f"{tuple(g.x.shape) if isinstance(g.x, Tensor) else type(g.x).__name__}")
        if g.x.shape[1] != self.num_node_features:
            raise ValueError(f"{name}: expected {self.num_node_features} node features, got {g.x.shape[1]}")
        if not torch.isfinite(g.x).all():
            raise ValueError(f"{name}: node features contain NaN or infinite values")
        ei = g.edge_index
        if not isinstance(ei, Tensor) or ei.ndim != 2 or ei.shape[0] != 2 or ei.dtype != torch.long:
            raise ValueError(f"{name}: edge_index must be a (2,E) long tensor")
        if ei.numel() and (int(ei.min()) < 0 or int(ei.max()) >= g.num_nodes):
            raise ValueError(f"{name}: edge_index refers to node {int(ei.max())} but the graph has "
                             f"{g.num_nodes} nodes")
        if g.edge_weight is not None and g.edge_weight.shape != (ei.shape[1],):
            raise ValueError(f"{name}: edge_weight must have shape ({ei.shape[1]},), got {tuple(g.edge_weight.shape)}")
        if self.uses_context:
            if g.context is None:
                raise ValueError(f"{name}: needs a context vector per node (data.context of shape (N,"
                                 f"{self.context_dim})); build the graph with zoo.data.GraphDataModule")
            if g.context.shape != (g.num_nodes, self.context_dim):
                raise ValueError(f"{name}: expected context of shape ({g.num_nodes},{self.context_dim}), "
                                 f"got {tuple(g.context.shape)}")
            if not torch.isfinite(g.context).all():
                raise ValueError(f"{name}: context contains NaN or infinite values")

    def validate_input(self, x) -> None:  # the base's image check does not apply
        self.validate_graph(x if isinstance(x, GraphInput) else GraphInput(x))

    # ------------------------------------------------------------------ computation
    def encode(self, g: GraphInput, context: Tensor | None = None) -> dict[str, Tensor]:
        """logits (N,K) and the last hidden layer h (N,hidden)."""
        h = g.x
        for conv in self.convs:
            h = F.dropout(h, self.dropout, self.training)
            h = F.elu(self._apply_conv(conv, h, g))
        return {"logits": self.classifier(F.dropout(h, self.dropout, self.training)), "h": h}

    def forward(self, x, edge_index: Tensor | None = None, edge_weight: Tensor | None = None,
                context: Tensor | None = None, **_: Any) -> Tensor:  # -> (N,K)
        g = GraphInput(x, edge_index, edge_weight, context)
        self.validate_graph(g)
        return self.encode(g)["logits"]

    def compute_logits(self, x) -> Tensor:
        return self(x)

    def loss(self, batch: dict[str, Any]) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """Full-batch step: the whole graph, loss on the split's mask only."""
        g = GraphInput(batch["graph"])
        self.validate_graph(g)
        out = self.encode(g)
        logits = out["logits"][batch["mask"]]  # (M,K)
        return self.task_loss(logits, batch["label"]), logits, {}

    # ------------------------------------------------------------------ explanation
    def edge_extras(self, g: GraphInput, nodes: Tensor, target: Tensor) -> dict[str, Tensor]:
        """Both families' edge explanation: ``edge_gradient`` (:meth:`edge_attribution`) and
        ``edge_mask`` (float32 for PyG): the edges whose message raises the explained logit."""
        grad = self.edge_attribution(g, nodes, target)
        return {"edge_gradient": grad, "edge_mask": (grad > 0).float()}

    def edge_attribution(self, g: GraphInput, nodes: Tensor, target: Tensor) -> Tensor:
        """(E,) d(sum of the explained logits ``logits[nodes, target]``)/d m_e at m = 1, where m (E,)
        multiplies every edge's message in every layer — PyG's ``set_masks`` hook (GCN, GAT and GIN
        alike; self-loops unmasked), the same hook PyG's fidelity uses to drop edges. Several explained
        nodes share one mask (PyG's one edge mask per explanation): explain one node for its own."""
        from torch_geometric.explain.algorithm.utils import clear_masks, set_masks

        mask = torch.ones(g.edge_index.shape[1], device=g.x.device, dtype=g.x.dtype, requires_grad=True)
        set_masks(self, mask, g.edge_index, apply_sigmoid=False)
        try:
            with torch.enable_grad():
                logits = self.encode(g)["logits"]
                (grad,) = torch.autograd.grad(logits[nodes].gather(1, target[:, None]).sum(), mask)
        finally:
            clear_masks(self)
        return grad.detach()

    def explain(self, x, target: Tensor | int | None = None, nodes: Tensor | None = None) -> Explanation:
        """Post-hoc gradient × input on the node features (the plain GNN has no own explanation) and
        the edge gradient (:meth:`edge_attribution`)."""
        g = GraphInput(x)
        self.validate_graph(g)
        nodes = _nodes(nodes, g.num_nodes, g.x.device)
        with torch.no_grad():
            logits = self.encode(g)["logits"][nodes]
        target = self.resolve_target(logits, target)
        feats = g.x.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            out = self.encode(GraphInput(feats, g.edge_index, g.edge_weight, g.context))["logits"]
            (grad,) = torch.autograd.grad(out[nodes].gather(1, target[:, None]).sum(), feats)
        return Explanation(logits=logits, target=target, kind="post-hoc",
                           extras={"nodes": nodes, "method": "gradient×input on node features",
                                   "feature_attribution": (grad * feats).detach()[nodes],
                                   **self.edge_extras(g, nodes, target)})


def _nodes(nodes, n: int, device) -> Tensor:
    if nodes is None:
        return torch.arange(n, device=device)
    nodes = torch.as_tensor(nodes, device=device, dtype=torch.long).reshape(-1)
    if nodes.numel() and (int(nodes.min()) < 0 or int(nodes.max()) >= n):
        raise ValueError(f"node index out of range 0..{n - 1}")
    return nodes


@register_model("xnode")
class XNode(GNN):
    """X-Node over a GCN / GAT / GIN backbone (see the module docstring)."""

    explanation_kind = "node-context"
    uses_context = True

    def __init__(self, backbone: str = "gcn", num_node_features: int = 128, context_dim: int = 6,
                 hidden: int = 64, layers: int = 2, heads: int = 4, dropout: float = 0.5,
                 reasoner_hidden: int = 64, explanation_dim: int = 32,  # paper: Reasoner 6→64→32
                 recon_weight: float = 1.0,  # faithfulness loss weight (MSE to the detached latent)
                 context_names: Sequence[str] | None = None, **base) -> None:
        self._e_dim = explanation_dim  # needed by _injected_dim while the convs are built
        super().__init__(backbone, num_node_features, context_dim, hidden, layers, heads, dropout, **base)
        names = list(context_names) if context_names is not None else list(CONTEXT_NAMES[:context_dim])
        if len(names) != context_dim:
            raise ValueError(f"context_names has {len(names)} names for context_dim={context_dim}")
        self.context_names = names
        # Paper sizes: Reasoner 6→64→32.
        self.reasoner = nn.Sequential(nn.Linear(context_dim, reasoner_hidden), nn.ReLU(),
                                      nn.Linear(reasoner_hidden, explanation_dim))
        self.decoder = nn.Sequential(nn.Linear(explanation_dim, reasoner_hidden), nn.ReLU(),
                                     nn.Linear(reasoner_hidden, hidden))

    def _injected_dim(self) -> int:
        return self._e_dim

    def encode(self, g: GraphInput, context: Tensor | None = None) -> dict[str, Tensor]:
        """logits (N,K), last hidden h (N,hidden), explanation vector e (N,E), reconstruction ĥ (N,hidden)."""
        e = self.reasoner(g.context if context is None else context)  # (N,E)
        h = g.x
        for conv in self.convs:
            h = F.dropout(h, self.dropout, self.training)
            h = F.elu(self._apply_conv(conv, torch.cat([h, e], dim=1), g))  # e rides along every message
        return {"logits": self.classifier(F.dropout(h, self.dropout, self.training)), "h": h, "e": e,
                "recon": self.decoder(e)}

    def loss(self, batch: dict[str, Any]) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        g = GraphInput(batch["graph"])
        self.validate_graph(g)
        out = self.encode(g)
        mask = batch["mask"]
        logits = out["logits"][mask]
        # Faithfulness: the explanation vector must rebuild the node's own latent (stop-gradient
        # target, so the GNN cannot shrink h to make this easy).
        recon = F.mse_loss(out["recon"][mask], out["h"][mask].detach())
        return self.task_loss(logits, batch["label"]) + self.hparams.recon_weight * recon, logits, {"recon_mse": recon}

    # ------------------------------------------------------------------ explanation
    @torch.no_grad()
    def context_ablation(self, g: GraphInput, nodes: Tensor, target: Tensor) -> Tensor:
        """(B,C) change of p(target) when cue j is set to its training mean (0) for every node."""
        base = self.encode(g)["logits"].softmax(1)[nodes].gather(1, target[:, None])
        return torch.cat([p[nodes].gather(1, target[:, None]) - base for p in ablated_probabilities(self, g)], dim=1)

    @torch.no_grad()
    def node_r2(self, g: GraphInput, nodes: Tensor, out: dict[str, Tensor] | None = None) -> Tensor:
        """(B,) per-node R² of the decoder: 1 − ‖ĥ−h‖² / ‖h − mean_train(h)‖²."""
        out = out or self.encode(g)
        train = g.extra.get("train_mask")
        ref = out["h"][train].mean(0) if train is not None and bool(train.any()) else out["h"].mean(0)
        h, rec = out["h"][nodes], out["recon"][nodes]
        return 1 - ((rec - h) ** 2).sum(1) / ((h - ref) ** 2).sum(1).clamp_min(1e-12)

    def explain(self, x, target: Tensor | int | None = None, nodes: Tensor | None = None) -> Explanation:
        g = GraphInput(x)
        self.validate_graph(g)
        nodes = _nodes(nodes, g.num_nodes, g.x.device)
        with torch.no_grad():
            out = self.encode(g)
        logits = out["logits"][nodes]  # (B,K)
        target = self.resolve_target(logits, target)
        probs = logits.softmax(1)
        ablation = self.context_ablation(g, nodes, target)  # (B,C)
        r2 = self.node_r2(g, nodes, out)
        names = g.extra.get("class_names") or [f"class {k}" for k in range(self.num_classes)]
        y_train = g.extra.get("y_train")
        if y_train is None:
            y_train = torch.full((g.num_nodes,), -1, dtype=torch.long, device=g.x.device)
        src, dst = g.edge_index
        # Incoming edges of each explained node (= its neighbours: graphs are symmetric), via a CSR
        # order on the target node, so explaining every node stays O(E) rather than O(N·E).
        order = torch.argsort(dst, stable=True)
        ptr = torch.zeros(g.num_nodes + 1, dtype=torch.long, device=dst.device)
        ptr[1:] = torch.bincount(dst, minlength=g.num_nodes).cumsum(0)
        in_edges = [order[ptr[i]:ptr[i + 1]] for i in nodes.tolist()]
        neighbours = [src[e] for e in in_edges]
        raw = g.extra.get("context_raw")
        texts = [describe(self, neighbours[b], int(t), probs[b], ablation[b], float(r2[b]), names, y_train,
                           None if raw is None else raw[int(i)], g.num_nodes)
                 for b, (i, t) in enumerate(zip(nodes.tolist(), target.tolist()))]
        entropy = -(probs * probs.clamp_min(1e-12).log()).sum(1)
        extras = {"nodes": nodes, "context_names": self.context_names, "explanation_vector": out["e"][nodes],
                  "reconstruction_r2": r2, "context_ablation": ablation, **self.edge_extras(g, nodes, target),
                  "neighbours": neighbours, "neighbour_train_labels": [y_train[nb] for nb in neighbours],
                  "class_names": list(names)}
        if raw is not None:
            extras["context_raw"] = raw[nodes]
        images = g.extra.get("images")
        if images is not None:
            extras["images"] = images[nodes]
            extras["neighbour_images"] = [images[nb] for nb in neighbours]
        return Explanation(logits=logits, target=target, kind="node-context", node_context=g.context[nodes],
                           node_text=texts, uncertainty={"entropy": entropy}, extras=extras)

    def report_rows(self, datamodule) -> dict[str, dict[str, float]]:
        """Test-split rows for train()'s table (report.py)."""
        return graph_rows(self, datamodule)
