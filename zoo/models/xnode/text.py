"""X-Node's offline text and its checker.

:func:`describe` writes one node's explanation as template sentences, each stating numbers (the
class probability, the training-labelled neighbours, the context cue whose removal moves the
probability most, graph position, saliency, the decoder's R²). :func:`check_text` recomputes every
number a text states — counts, degree, weighted degree and clustering from the edge list with plain
Python sets (independently of the graph builder), probabilities, ablations and R² by running the
model again, PageRank and saliency against the context the model consumed — so no sentence can
claim what the model and the graph do not show. No language model is involved.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor

from zoo.graph_input import CONTEXT_NAMES, GraphInput
from zoo.metrics.graphs import ablated_probabilities

# Each template states numbers; CHECKS below recompute every one of them from the model and graph.
T_PROB = "The model gives {cls} probability {p:.2f}; its prediction is {pred}."
T_NEIGH = "{a} of its {m} training-labelled neighbours are labelled {cls} (it has {d} neighbours)."
T_NONE = "None of its {d} neighbours has a training label."
T_CUE = "Its prediction rests mostly on {cue}: removing that cue changes the probability of {cls} by {delta:+.2f}."
T_CUE_SMALL = "No single context cue decides it: removing any one changes the probability of {cls} by at most {delta:.3f}."
T_GRAPH = ("Graph position: degree {d}, weighted degree {wd:.2f}, clustering coefficient {cc:.2f}, "
           "PageRank {pr:.2f} times the average node.")
T_SAL = "The saliency of its own embedding is {s:.2f}."
T_R2 = "The decoder rebuilds its latent embedding from the explanation vector with R² {r2:.2f}."


def describe(model, nb: Tensor, t: int, probs: Tensor, ablation: Tensor, r2: float,
              names: list[str], y_train: Tensor, raw: Tensor | None, num_nodes: int) -> str:
    """The text of one node explaining class `t`; `nb` its neighbours, `raw` its raw context."""
    labels = y_train[nb]
    m, a = int((labels >= 0).sum()), int((labels == t).sum())
    j = int(ablation.abs().argmax())
    parts = [T_PROB.format(cls=names[t], p=float(probs[t]), pred=names[int(probs.argmax())]),
             T_NEIGH.format(a=a, m=m, cls=names[t], d=len(nb)) if m else T_NONE.format(d=len(nb)),
             T_CUE.format(cue=model.context_names[j], cls=names[t], delta=float(ablation[j]))
             if abs(float(ablation[j])) >= 0.005 else T_CUE_SMALL.format(cls=names[t], delta=abs(float(ablation[j])))]
    if raw is not None and set(CONTEXT_NAMES) <= set(model.context_names):
        col = {n: float(raw[model.context_names.index(n)]) for n in CONTEXT_NAMES}
        parts.append(T_GRAPH.format(d=int(round(col["degree"])), wd=col["weighted_degree"], cc=col["clustering"],
                                    pr=col["pagerank"] * num_nodes))
        parts.append(T_SAL.format(s=col["saliency"]))
    parts.append(T_R2.format(r2=r2))
    return " ".join(parts)


def _pattern(template: str) -> re.Pattern:
    """A regex with one named group per {field} of `template` (numbers and names)."""
    out, pos = "", 0
    for m in re.finditer(r"\{(\w+)(:[^}]*)?\}", template):
        out += re.escape(template[pos:m.start()])
        out += f"(?P<{m.group(1)}>[-+]?[0-9.eE]+|.+?)"
        pos = m.end()
    return re.compile(out + re.escape(template[pos:]))


def _close(stated: str, value: float) -> bool:
    decimals = len(stated.split(".")[1]) if "." in stated else 0
    return abs(float(stated) - value) <= 0.5 * 10 ** -decimals + 1e-6


def check_text(model, data, node: int, text: str, target: int | None = None) -> list[tuple[str, bool, str]]:
    """Recompute every number stated in `text` (the explanation of `node`) from the model and graph.

    Returns one (sentence, ok, detail) per sentence; a sentence matching no template fails
    ("unverifiable"). Counts, degree, weighted degree and clustering are recomputed from the edge
    list with plain Python sets (independently of the graph builder); probabilities, ablations and R²
    by running the model again; PageRank and saliency against the context the model consumed.
    """
    model.eval()
    g = GraphInput(data)
    names = g.extra.get("class_names") or [f"class {k}" for k in range(model.num_classes)]
    with torch.no_grad():
        out = model.encode(g)
    probs = out["logits"].softmax(1)[node]
    src, dst = g.edge_index.tolist()
    adj: dict[int, set[int]] = {}
    weight_in = 0.0
    ew = g.edge_weight.tolist() if g.edge_weight is not None else [1.0] * len(src)
    for s, d, w in zip(src, dst, ew):
        adj.setdefault(d, set()).add(s)
        if d == node:
            weight_in += w
    nb = sorted(adj.get(node, set()))
    y_train = g.extra.get("y_train")
    y_train = y_train.tolist() if y_train is not None else [-1] * g.num_nodes
    raw = g.extra.get("context_raw")
    results = []
    sentences = _split_sentences(text)

    def cls_index(name: str) -> int:
        if name not in names:
            raise KeyError(name)
        return names.index(name)

    for sentence in sentences:
        ok, detail = False, "unverifiable: matches no template"
        try:
            if (m := _pattern(T_PROB).fullmatch(sentence)):
                k, pred = cls_index(m["cls"]), cls_index(m["pred"])
                ok = _close(m["p"], float(probs[k])) and pred == int(probs.argmax())
                detail = f"p={float(probs[k]):.4f}, argmax={names[int(probs.argmax())]}"
            elif (m := _pattern(T_NEIGH).fullmatch(sentence)):
                k = cls_index(m["cls"])
                labelled = [y_train[j] for j in nb if y_train[j] >= 0]
                truth = (sum(1 for y in labelled if y == k), len(labelled), len(nb))
                ok = (int(m["a"]), int(m["m"]), int(m["d"])) == truth
                detail = f"agree={truth[0]}, labelled={truth[1]}, neighbours={truth[2]}"
            elif (m := _pattern(T_NONE).fullmatch(sentence)):
                labelled = [j for j in nb if y_train[j] >= 0]
                ok = not labelled and int(m["d"]) == len(nb)
                detail = f"labelled={len(labelled)}, neighbours={len(nb)}"
            elif (m := (_pattern(T_CUE).fullmatch(sentence) or _pattern(T_CUE_SMALL).fullmatch(sentence))):
                k = cls_index(m["cls"])
                deltas = [float(p[node, k] - probs[k]) for p in ablated_probabilities(model, g)]
                top = max(range(len(deltas)), key=lambda j: abs(deltas[j]))
                if "cue" in m.groupdict():
                    ok = m["cue"] == model.context_names[top] and _close(m["delta"], deltas[top])
                else:
                    ok = _close(m["delta"], abs(deltas[top])) and abs(deltas[top]) < 0.005
                detail = f"largest change: {model.context_names[top]} {deltas[top]:+.4f}"
            elif (m := _pattern(T_GRAPH).fullmatch(sentence)):
                pairs = sum(1 for a in nb for b in nb if a < b and b in adj.get(a, set()))
                deg = len(nb)
                cc = pairs / (deg * (deg - 1) / 2) if deg > 1 else 0.0
                pr = float(raw[node, model.context_names.index("pagerank")]) * g.num_nodes
                ok = (int(m["d"]) == deg and _close(m["wd"], weight_in) and _close(m["cc"], cc)
                      and _close(m["pr"], pr))
                detail = f"degree={deg}, weighted={weight_in:.4f}, clustering={cc:.4f}, pagerank×N={pr:.4f}"
            elif (m := _pattern(T_SAL).fullmatch(sentence)):
                s = float(raw[node, model.context_names.index("saliency")])
                ok, detail = _close(m["s"], s), f"saliency={s:.4f}"
            elif (m := _pattern(T_R2).fullmatch(sentence)):
                r2 = float(model.node_r2(g, torch.tensor([node], device=g.x.device), out)[0])
                ok, detail = _close(m["r2"], r2), f"R²={r2:.4f}"
        except (KeyError, ValueError) as err:
            ok, detail = False, f"unverifiable: {err}"
        results.append((sentence, bool(ok), detail))
    return results


def _split_sentences(text: str) -> list[str]:
    """Sentences end with '.' or ';'-free full stops followed by a space and a capital letter / end."""
    parts = re.split(r"(?<=\.)\s+(?=[A-Z0-9])", text.strip())
    return [p for p in parts if p]
