"""Metrics for node explanations on graphs (X-Node), and interop with torch_geometric.explain.

* :func:`r2_score` — variance-weighted R² of a reconstruction (torchmetrics).
* :func:`decoder_r2` — the model's own decoder: how well the explanation vector e rebuilds the
  node's latent h on a node mask; :func:`control_decoder_r2` — the same reasoner+decoder
  architecture trained to rebuild the same h from *shuffled* context vectors (a control: what R²
  needs no node-specific information) and, for reference, from the real context (a probe).
* :func:`ablated_probabilities` — the context ablation itself (each cue set to its training mean, 0,
  for every node; X-Node's explanation and text checker use it too);
  :func:`context_ablation_fidelity` — mean |Δp| and flip rate under it.
* :func:`to_pyg` / :func:`pyg_fidelity` — a ``torch_geometric.explain.Explanation`` (float32
  masks) of the model's own explanation, and PyG's fid+ / fid− / characterisation score for it.

Models here are called like PyG models: ``model(x, edge_index, edge_weight=..., context=...)``;
``model.encode`` and ``model.reasoner``/``decoder`` are used for the X-Node-specific metrics.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zoo.graph_input import GraphInput


def r2_score(pred: Tensor, target: Tensor) -> float:
    """Variance-weighted R² over all dimensions (1 = perfect, 0 = the mean, < 0 worse)."""
    import torchmetrics.functional as TMF

    return float(TMF.r2_score(pred, target, multioutput="variance_weighted"))


def _graph(model, data) -> GraphInput:
    return GraphInput(data)


@torch.no_grad()
def ablated_probabilities(model, g: GraphInput) -> list[Tensor]:
    """The one context ablation: per cue j (in the model's context order), the class probabilities
    (N,K) of every node when cue j is set to its training mean — 0, the context being standardised
    with training-node statistics — for every node at once, and the model is run again."""
    out = []
    for j in range(model.context_dim):
        ctx = g.context.clone()
        ctx[:, j] = 0.0
        out.append(model.encode(g, ctx)["logits"].softmax(1))
    return out


@torch.no_grad()
def decoder_r2(model, data, mask: Tensor) -> float:
    """R² of the model's own decoder ĥ = Dec(e) against its latent h on `mask` nodes."""
    model.eval()
    out = model.encode(_graph(model, data))
    return r2_score(out["recon"][mask], out["h"][mask])


def control_decoder_r2(model, data, train_mask: Tensor, eval_mask: Tensor, epochs: int = 300, lr: float = 1e-2,
                       seed: int = 0) -> dict[str, float]:
    """Fresh reasoner+decoder (same architecture) fitted on train nodes to the model's latent h.

    ``shuffled``: from context rows permuted across nodes (the control); ``real``: from the real
    context (a probe trained the same way, so the gap is not a training-procedure artefact).
    """
    model.eval()
    g = _graph(model, data)
    with torch.no_grad():
        target = model.encode(g)["h"]  # (N,hidden), detached
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(g.num_nodes, generator=gen).to(target.device)
    results = {}
    for name, context in (("shuffled", g.context[perm]), ("real", g.context)):
        torch.manual_seed(seed)
        probe = nn.Sequential(_clone_fresh(model.reasoner), _clone_fresh(model.decoder)).to(target.device)
        opt = torch.optim.Adam(probe.parameters(), lr=lr)
        for _ in range(epochs):
            loss = F.mse_loss(probe(context[train_mask]), target[train_mask])
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            results[name] = r2_score(probe(context[eval_mask]), target[eval_mask])
    return results


def _clone_fresh(module: nn.Module) -> nn.Module:
    """A copy of `module` with freshly initialised weights."""
    import copy

    fresh = copy.deepcopy(module)
    for m in fresh.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    return fresh


@torch.no_grad()
def context_ablation_fidelity(model, data, mask: Tensor) -> dict[str, dict[str, float]]:
    """Per cue: mean |Δp(predicted class)| and the fraction of predictions that flip on `mask` nodes."""
    model.eval()
    g = _graph(model, data)
    probs = model.encode(g)["logits"].softmax(1)[mask]
    pred = probs.argmax(1, keepdim=True)
    out = {}
    for name, ablated in zip(model.context_names, ablated_probabilities(model, g)):
        p = ablated[mask]
        out[name] = {"mean_abs_dp": float((p.gather(1, pred) - probs.gather(1, pred)).abs().mean()),
                     "flip_rate": float((p.argmax(1, keepdim=True) != pred).float().mean())}
    return out


def to_pyg(expl, data):
    """The model's own explanation as a ``torch_geometric.explain.Explanation`` (float32 masks).

    ``edge_mask`` (E,): the edges whose gradient raises the explained logits (the model's own
    computation, ``model.edge_attribution``); ``index``: the explained nodes; ``target``: their explained class; the model's
    extra inputs (edge_weight, context) travel as model arguments so PyG metrics can rerun it.
    """
    from torch_geometric.explain import Explanation as PygExplanation

    nodes = expl.extras["nodes"]
    kwargs = {"edge_weight": data.edge_weight, "context": data.context}
    pyg = PygExplanation(x=data.x, edge_index=data.edge_index, edge_mask=expl.extras["edge_mask"].float(),
                         index=nodes, **kwargs)
    pyg._model_args = list(kwargs)
    return pyg


def pyg_fidelity(model, data, nodes: Tensor) -> dict[str, float]:
    """PyG fid+, fid− (model explanations) and the characterisation score for the model's own
    explanation of `nodes` (its edge mask: the edges with positive edge gradient).

    fid+ = 1 − P(prediction unchanged when the explanation's edges are removed);
    fid− = 1 − P(prediction unchanged when only the explanation's edges are kept).
    """
    from torch_geometric.explain import Explainer, ExplainerAlgorithm
    from torch_geometric.explain.metric import characterization_score, fidelity

    class OwnExplanation(ExplainerAlgorithm):  # the model explains itself; PyG only measures
        def forward(self, model, x, edge_index, *, target, index=None, **kwargs):
            raise NotImplementedError("the edge explanation comes from model.explain")

        def supports(self) -> bool:
            return True

    model.eval()
    explainer = Explainer(model, algorithm=OwnExplanation(), explanation_type="model", edge_mask_type="object",
                          model_config=dict(mode="multiclass_classification", task_level="node", return_type="raw"))
    expl = model.explain(data, nodes=nodes)
    pyg = to_pyg(expl, data)
    with torch.no_grad():
        full = model(data.x, data.edge_index, edge_weight=data.edge_weight, context=data.context)
    pyg.target = full.argmax(1)  # model explanations: fidelity is measured against the model's predictions
    fid_plus, fid_minus = fidelity(explainer, pyg)
    if fid_plus == 0 or fid_minus == 1:  # characterisation score is a harmonic mean: 0 when a side is 0
        char = 0.0
    else:
        char = float(characterization_score(torch.tensor(fid_plus), torch.tensor(fid_minus)))
    return {"fid_plus": fid_plus, "fid_minus": fid_minus, "characterization": char}


__all__ = ["ablated_probabilities", "context_ablation_fidelity", "control_decoder_r2", "decoder_r2", "pyg_fidelity", "r2_score", "to_pyg"]
