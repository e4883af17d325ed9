"""X-Node family: graph builder, leakage, context cues, model identities, text claims, PyG interop."""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch

import zoo
from zoo.data import GraphDataModule, SyntheticDataModule
from zoo.data.graphs import (
    CONTEXT_NAMES,
    clustering_coefficient,
    context_vectors,
    knn_graph,
    pagerank,
)
from zoo.metrics import graphs as GM
from zoo.models.xnode import GraphInput, check_text
from zoo.training import prepare_graph


# ---------------------------------------------------------------------- fixtures
SEED = 0  # of the trained model (`built`); the learning test's thresholds sit far below seeds 0, 1 and 2 (issue #13)


def _images(permute_test: bool = False, seed: int = 0) -> SyntheticDataModule:
    # No distractors: a 16 px, 3-class task a tiny encoder learns in a second. 200 test nodes: the
    # accuracy and R² of the learning test are measured on them (80 left ±0.03 of sampling noise).
    dm = SyntheticDataModule(image_size=16, num_classes=3, n_train=300, n_val=40, n_test=200, distractors=0, seed=seed)
    dm.setup()
    if permute_test:  # shuffle the val and test labels in place: nothing before evaluation may notice
        g = torch.Generator().manual_seed(123)
        for split in ("val", "test"):
            ds = dm.dataset(split)
            ds.tensors["label"] = ds.tensors["label"][torch.randperm(len(ds.tensors["label"]), generator=g)]
    return dm


def _graph_dm(images, cache_dir=None, **kw) -> GraphDataModule:
    kw = {"encoder_widths": (16, 32), "encoder_epochs": 4, "encoder_batch_size": 16, "k": 5, "steps_per_epoch": 10, **kw}
    dm = GraphDataModule(images=images, cache_dir=cache_dir, **kw)
    prepare_graph(dm)  # the recipe's encoder, fitted by the training code unless the graph is cached
    dm.setup()
    return dm


def _train(dm: GraphDataModule, name: str = "xnode", epochs: int = 6, seed: int = 0, **hp):
    L.seed_everything(seed, verbose=False)
    model = zoo.create_model(name, num_classes=dm.num_classes, **dm.model_kwargs, lr=1e-2, **hp)
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(model, datamodule=dm)
    return model.eval()


def _build(seed: int):
    dm = _graph_dm(_images(seed=seed), seed=seed)
    return dm, _train(dm, seed=seed)


@pytest.fixture(scope="module")
def built():
    return _build(SEED)


# ---------------------------------------------------------------------- graph pieces
def test_knn_graph_is_symmetric_cosine_and_chunk_invariant():
    torch.manual_seed(0)
    feats = torch.randn(97, 5).relu()
    ei, w = knn_graph(feats, k=4, chunk=1000)
    ei2, w2 = knn_graph(feats, k=4, chunk=7)  # chunking must not change the graph
    assert torch.equal(ei, ei2) and torch.allclose(w, w2)
    assert not (ei[0] == ei[1]).any()  # no self-loops
    pairs = set(map(tuple, ei.T.tolist()))
    assert all((j, i) in pairs for i, j in pairs)  # symmetric
    assert torch.bincount(ei[1], minlength=97).min() >= 4  # everyone keeps its own k picks
    f = torch.nn.functional.normalize(feats, dim=1)
    torch.testing.assert_close(w, (f[ei[0]] * f[ei[1]]).sum(1).clamp_min(0))  # weight = cosine similarity
    # node 0's own 4 picks are exactly its 4 most similar nodes
    sim = f @ f[0]
    sim[0] = -2
    assert set(sim.topk(4).indices.tolist()) <= set(ei[0][ei[1] == 0].tolist())


def test_knn_graph_rejects_bad_arguments():
    with pytest.raises(ValueError, match="unknown kNN metric 'manhattan'"):
        knn_graph(torch.randn(5, 2), k=2, metric="manhattan")
    with pytest.raises(ValueError, match=r"k must be in 1..4 for 5 nodes, got 5"):
        knn_graph(torch.randn(5, 2), k=5)


def test_clustering_and_pagerank_match_networkx_on_a_disconnected_graph():
    nx = pytest.importorskip("networkx")
    g = nx.gnm_random_graph(40, 90, seed=1)
    g.add_edges_from([(40, 41), (41, 42), (42, 40)])  # a separate triangle component
    edges = torch.tensor(list(g.edges())).T
    ei = torch.cat([edges, edges.flip(0)], dim=1)
    n = g.number_of_nodes()
    cc = clustering_coefficient(ei, n)
    torch.testing.assert_close(cc, torch.tensor([nx.clustering(g)[i] for i in range(n)], dtype=torch.float32))
    w = torch.rand(ei.shape[1])
    w = (w + w[torch.cat([torch.arange(edges.shape[1], ei.shape[1]), torch.arange(edges.shape[1])])]) / 2
    dg = nx.DiGraph()
    dg.add_nodes_from(range(n))
    dg.add_weighted_edges_from([(int(a), int(b), float(c)) for (a, b), c in zip(ei.T, w)])
    ref = nx.pagerank(dg, alpha=0.85, weight="weight", tol=1e-12)
    torch.testing.assert_close(pagerank(ei, n, w), torch.tensor([ref[i] for i in range(n)]), atol=1e-6, rtol=1e-4)


def test_context_cues_on_a_constructed_graph():
    # node 0 has neighbours 1, 2, 3 (1-2 connected); 1 and 2 are training-labelled 1 and 0; 3 unlabelled.
    und = torch.tensor([[0, 0, 0, 1], [1, 2, 3, 2]])
    ei = torch.cat([und, und.flip(0)], dim=1)
    w = torch.tensor([0.5, 0.25, 1.0, 0.8]).repeat(2)
    y_train = torch.tensor([-1, 1, 0, -1])
    logits = torch.tensor([[0.0, 3.0], [0, 1], [1, 0], [1, 0]])  # encoder predicts class 1 for node 0
    ctx = context_vectors(ei, w, y_train, logits, saliency=torch.arange(4.0))
    c = dict(zip(CONTEXT_NAMES, ctx[0].tolist()))
    assert c["degree"] == 3 and c["weighted_degree"] == pytest.approx(1.75)
    assert c["clustering"] == pytest.approx(1 / 3)  # one edge (1-2) among 3 neighbour pairs
    assert c["label_agreement"] == pytest.approx(0.5)  # 1 of 2 labelled neighbours says class 1
    assert c["saliency"] == 0.0
    assert ctx[3, CONTEXT_NAMES.index("label_agreement")] == 0.5  # no labelled neighbour → 1/K


# ---------------------------------------------------------------------- datamodule, cache, leakage
def test_graph_datamodule_layout_and_cache(tmp_path):
    images = _images()
    dm = _graph_dm(images, cache_dir=tmp_path)
    g = dm.graph
    n = 300 + 40 + 200
    assert g.x.shape == (n, 32) and g.context.shape == (n, len(CONTEXT_NAMES))
    assert int(g.train_mask.sum()) == 300 and int(g.test_mask.sum()) == 200
    assert (g.y_train[~g.train_mask] == -1).all()  # the graph carries no val/test label
    torch.testing.assert_close(g.context[g.train_mask].mean(0), torch.zeros(6), atol=1e-5, rtol=0)
    batch = next(iter(dm.test_dataloader()))
    assert torch.equal(batch["label"], dm.labels("test")) and len(dm.train_dataloader()) == 10
    assert dm.cache_path is not None and (dm.cache_path / "graph.safetensors").is_file()
    again = _graph_dm(images, cache_dir=tmp_path)  # same inputs → loaded, identical
    assert again.cache_path == dm.cache_path and torch.equal(again.graph.context, g.context)
    other = _graph_dm(images, cache_dir=tmp_path, k=6)
    assert other.cache_path != dm.cache_path


def test_permuting_val_and_test_labels_changes_no_feature_context_or_weight():
    a = _graph_dm(_images())
    b = _graph_dm(_images(permute_test=True))
    assert not torch.equal(a.labels("test"), b.labels("test"))  # the permutations did happen
    assert not torch.equal(a.labels("val"), b.labels("val"))
    for key in ("x", "edge_index", "edge_weight", "context", "context_raw", "y_train", "encoder_logits"):
        assert torch.equal(getattr(a.graph, key), getattr(b.graph, key)), key
    for ea, eb in zip(a.encoders, b.encoders, strict=True):
        for (k, va), vb in zip(ea.state_dict().items(), eb.state_dict().values()):
            assert torch.equal(va, vb), f"encoder {k}"
    ma, mb = _train(a, epochs=2), _train(b, epochs=2)
    for (k, va), vb in zip(ma.state_dict().items(), mb.state_dict().values()):
        assert torch.equal(va, vb), f"xnode {k}"


# ---------------------------------------------------------------------- model
def _learning_scores(dm, model, seed: int = 0) -> dict[str, float]:
    data = dm.graph
    with torch.no_grad():
        pred = model(data).argmax(1)
    acc = float((pred[data.test_mask] == dm.labels("test")).float().mean())
    control = GM.control_decoder_r2(model, data, data.train_mask, data.test_mask, epochs=150, seed=seed)
    return {"acc": acc, "r2": GM.decoder_r2(model, data, data.test_mask), "shuffled": control["shuffled"]}


def test_xnode_learns_and_its_decoder_beats_a_shuffled_control(built):
    """Cross-fitted graph (folds=5). Seeds 0/1/2: test accuracy 0.885/0.875/0.89, decoder R² 0.45/0.33/0.31,
    shuffled-context control −0.53/−0.40/−0.41. R² 0: a decoder that outputs the mean."""
    got = _learning_scores(*built, seed=SEED)
    assert got["acc"] >= 0.7, f"test accuracy {got['acc']:.3f}; 3 classes: chance ≈ 0.33"
    assert got["r2"] >= 0.05, f"decoder R² {got['r2']:.3f}; 0 = the mean"
    assert got["r2"] > got["shuffled"] + 0.3, f"decoder R² {got['r2']:.3f} vs shuffled control {got['shuffled']:.3f}"


@pytest.mark.parametrize("backbone", ["gcn", "gat", "gin"])
def test_context_is_injected_into_message_passing(backbone):
    torch.manual_seed(0)
    model = zoo.create_model("xnode", backbone=backbone, num_classes=3, num_node_features=4).eval()
    data = model.example_input(4)  # a ring 0-1-2-3-0
    before = model(data)
    data.context[2] += 1.0  # node 2's context reaches its neighbours 1 and 3 only through messages
    after = model(data)
    assert not torch.allclose(before[1], after[1]) and not torch.allclose(before[3], after[3])
    # the plain GNN ignores context entirely
    plain = zoo.create_model("gnn", backbone=backbone, num_classes=3, num_node_features=4).eval()
    torch.testing.assert_close(plain(data), plain(model.example_input(4)))


def test_reconstruction_target_is_detached():
    torch.manual_seed(0)
    model = zoo.create_model("xnode", num_classes=3, num_node_features=4).eval()  # no dropout: exact identity
    data = model.example_input(5)
    batch = {"graph": data, "mask": torch.ones(5, dtype=torch.bool), "label": torch.zeros(5, dtype=torch.long)}
    model.hparams.recon_weight = 1.0
    loss_full, _, logs = model.loss(batch)
    ce = model.task_loss(model.encode(GraphInput(data))["logits"], batch["label"])
    torch.testing.assert_close(loss_full, ce + logs["recon_mse"])
    grads = torch.autograd.grad(logs["recon_mse"], [model.convs[0].lin.weight, model.decoder[0].weight],
                                allow_unused=True)
    assert grads[0] is None or float(grads[0].abs().sum()) == 0.0  # no gradient into the GNN
    assert float(grads[1].abs().sum()) > 0


@pytest.mark.parametrize("backbone", ["gat", "gin"])
def test_save_load_other_backbones(backbone, tmp_path):
    model = zoo.create_model("xnode", backbone=backbone, num_classes=2, num_node_features=6).eval()
    x = model.example_input(3)
    loaded = zoo.load(zoo.save(model, tmp_path / backbone))
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_bad_graph_inputs_give_clear_errors():
    model = zoo.create_model("xnode", num_classes=3, num_node_features=4).eval()
    data = model.example_input(3)
    with pytest.raises(ValueError, match="expected 4 node features, got 5"):
        model(torch.randn(3, 5), data.edge_index, context=data.context)
    with pytest.raises(ValueError, match="needs a context vector"):
        model(data.x, data.edge_index)
    with pytest.raises(ValueError, match="refers to node 7 but the graph has 3 nodes"):
        model(data.x, torch.tensor([[0, 7], [7, 0]]), context=data.context)
    bad = data.x.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        model(bad, data.edge_index, context=data.context)
    with pytest.raises(ValueError, match="target class out of range"):
        model.explain(data, target=5)
    with pytest.raises(ValueError, match="unknown GNN backbone 'sage'"):
        zoo.create_model("xnode", backbone="sage")


# ---------------------------------------------------------------------- explanation, text, interop
def test_every_text_claim_checks_out(built):
    dm, model = built
    nodes = dm.graph.test_mask.nonzero().squeeze(1)[:12]
    expl = model.explain(dm.graph, nodes=nodes)
    assert expl.kind == "node-context" and expl.attribution is None
    for b, node in enumerate(nodes.tolist()):
        results = check_text(model, dm.graph, node, expl.node_text[b])
        assert len(results) >= 6
        failed = [r for r in results if not r[1]]
        assert not failed, failed
    # forced target: the text talks about that class and still checks out
    forced = model.explain(dm.graph, target=2, nodes=nodes[:3])
    for b, node in enumerate(nodes[:3].tolist()):
        assert all(ok for _, ok, _ in check_text(model, dm.graph, node, forced.node_text[b]))


def test_checker_catches_wrong_numbers_and_unknown_claims(built):
    dm, model = built
    node = int(dm.graph.test_mask.nonzero()[0])
    text = model.explain(dm.graph, nodes=[node]).node_text[0]
    import re

    # change the first stated probability by +0.2 (kept in [0,1] by wrapping)
    m = re.search(r"probability (\d\.\d\d)", text)
    wrong = f"{(float(m.group(1)) + 0.2) % 1:.2f}"
    tampered = text.replace(f"probability {m.group(1)}", f"probability {wrong}", 1)
    assert not check_text(model, dm.graph, node, tampered)[0][1]
    claims = check_text(model, dm.graph, node, "All of its neighbours are labelled malignant.")
    assert claims == [(claims[0][0], False, "unverifiable: matches no template")]


def test_context_ablation_is_exact_for_an_unused_cue(built):
    dm, model = built
    m = copy.deepcopy(model)
    with torch.no_grad():
        m.reasoner[0].weight[:, 0] = 0.0  # cue 0 ("degree") can no longer matter
    expl = m.explain(dm.graph, nodes=torch.arange(20))
    assert float(expl.extras["context_ablation"][:, 0].abs().max()) == 0.0
    fid = GM.context_ablation_fidelity(m, dm.graph, dm.graph.test_mask)
    assert fid["degree"] == {"mean_abs_dp": 0.0, "flip_rate": 0.0}


def test_pyg_explanation_and_fidelity(built):
    dm, model = built
    nodes = dm.graph.test_mask.nonzero().squeeze(1)[:30]
    expl = model.explain(dm.graph, nodes=nodes)
    pyg = GM.to_pyg(expl, dm.graph)
    assert pyg.edge_mask.dtype == torch.float32 and pyg.edge_mask.shape == (dm.graph.edge_index.shape[1],)
    pyg.validate(raise_on_error=True)
    # the mask marks exactly the edges whose message raises the explained logits (the model's gradient)
    assert torch.equal(pyg.edge_mask.bool(), expl.extras["edge_gradient"] > 0) and pyg.edge_mask.any()
    scores = GM.pyg_fidelity(model, dm.graph, nodes)
    assert 0 <= scores["fid_plus"] <= 1 and 0 <= scores["fid_minus"] <= 1 and 0 <= scores["characterization"] <= 1


@pytest.mark.parametrize("name", ["xnode", "gnn"])
def test_edge_gradient_is_the_models_own_edge_sensitivity(built, name):
    """edge_attribution = d logit / d m_e for a mask m scaling every edge's message (PyG's hook): it
    matches a central finite difference, and removing the top-|gradient| edges moves the logit more
    than removing as many random edges of the same 2-hop neighbourhood."""
    from torch_geometric.explain.algorithm.utils import clear_masks, set_masks

    dm, xnode = built
    model = copy.deepcopy(xnode if name == "xnode" else _train(dm, name="gnn", epochs=2)).double()  # float64: exact FD
    g = dm.graph.clone()
    for key in ("x", "edge_weight", "context"):
        g[key] = g[key].double()
    node, target = torch.tensor([int(dm.graph.test_mask.nonzero()[0])]), torch.tensor([1])
    grad = model.edge_attribution(GraphInput(g), node, target)

    def logit(mask):
        set_masks(model, mask, g.edge_index, apply_sigmoid=False)
        try:
            with torch.no_grad():
                return float(model(g)[node, target])
        finally:
            clear_masks(model)

    ones = torch.ones(g.edge_index.shape[1], dtype=torch.float64)
    top = grad.abs().topk(5).indices
    for e in top.tolist():
        step = torch.zeros_like(ones)
        step[e] = 1e-4
        assert (logit(ones + step) - logit(ones - step)) / 2e-4 == pytest.approx(float(grad[e]), rel=1e-4, abs=1e-8)
    hop = (grad != 0).nonzero().squeeze(1)  # the edges that can reach the node at all
    cut = lambda edges: abs(logit(ones.index_fill(0, edges, 0.0)) - logit(ones))  # noqa: E731
    g_rand = torch.Generator().manual_seed(0)
    random_cut = sum(cut(hop[torch.randperm(len(hop), generator=g_rand)[:5]]) for _ in range(20)) / 20
    assert cut(top) > random_cut


def test_cross_fitting_no_node_is_embedded_by_an_encoder_that_saw_it():
    """folds=5: node i is embedded by encoder fold[i], fitted on the training nodes outside fold[i];
    relabelling fold 0's training nodes leaves every fold-0 node's features, saliency, encoder logits
    and encoder 0 bit-identical (encoder 0 never read those labels) while the other encoders change."""
    images = _images()
    a = _graph_dm(images, folds=5)
    subsets, fold = a.encoder_subsets(), a.graph.fold
    train_fold = fold[a.graph.train_mask]
    for f, subset in enumerate(subsets):
        assert not subset[train_fold == f].any() and subset[train_fold != f].all()
    counts = torch.bincount(fold[a.graph.test_mask], minlength=5)
    assert counts.max() - counts.min() <= 1  # val/test nodes spread over the folds too
    b_images = _images()
    ds = b_images.dataset("train")
    rows = (train_fold == 0).nonzero().squeeze(1)
    ds.tensors["label"][rows] = (ds.tensors["label"][rows] + 1) % 3  # fold 0's training labels, all wrong
    b = _graph_dm(b_images, folds=5)
    assert torch.equal(b.graph.fold, fold)  # fold assignment reads no label
    in0 = fold == 0
    raw_a, raw_b = a.graph.encoder_logits, b.graph.encoder_logits
    assert torch.equal(raw_a[in0], raw_b[in0]) and not torch.equal(raw_a[~in0], raw_b[~in0])
    assert torch.equal(a.graph.context_raw[in0, CONTEXT_NAMES.index("saliency")],
                       b.graph.context_raw[in0, CONTEXT_NAMES.index("saliency")])
    for (k, va), vb in zip(a.encoders[0].state_dict().items(), b.encoders[0].state_dict().values()):
        assert torch.equal(va, vb), f"encoder 0 {k}"
    assert not torch.equal(a.encoders[1].head.weight, b.encoders[1].head.weight)


def test_node_context_figure(built, tmp_path):
    dm, model = built
    expl = model.explain(dm.graph, nodes=torch.tensor([0, 200]))
    path = tmp_path / "node.png"
    fig = expl.plot(path)
    assert path.is_file() and path.stat().st_size > 10_000
    texts = [t.get_text() for ax in fig.axes for t in ax.texts]
    assert any("training-labelled neighbours" in t.replace("\n", " ") for t in texts)


@pytest.mark.slow
def test_train_entry_point_on_a_medmnist_graph(medmnist_dir, tmp_path):
    from conftest import compose

    from zoo.training import train

    cfg = compose(["data=graph_breastmnist", "model=xnode", f"data.root={medmnist_dir}",
                   "data.encoder_epochs=5", f"data.cache_dir={tmp_path / 'cache'}", "trainer.max_epochs=3",
                   "trainer.log_every_n_steps=1", "logger=none", "callbacks=none", f"seed={SEED}"], tmp_path / "run")
    flat = train(cfg)
    # Cross-fitted (5 encoders × 5 epochs). Seeds 0/1/2: AUROC 0.712/0.707/0.698, accuracy 0.744/0.750/0.750 (the
    # majority class alone scores 0.731: accuracy cannot tell learning here), decoder R² 0.44/0.55/0.44 vs the
    # shuffled control −0.85/−0.46/−1.07.
    auroc, r2 = flat["xnode/auroc"], flat["xnode (node-context)/decoder_r2"]
    assert auroc >= 0.6, f"test AUROC {auroc:.3f}; chance is 0.5"
    control = flat["xnode (node-context)/control_r2_shuffled"]
    assert r2 >= 0.2 and r2 > control + 0.3, f"decoder R² {r2:.3f} (0 = the mean) vs shuffled control {control:.3f}"
    saved = tmp_path / "run" / "model"
    assert (saved / "graph.yaml").is_file() and (saved / "encoders" / "4" / "model.safetensors").is_file()
    # The saved folder ships its graph recipe: rebuilding the graph from it reproduces the test accuracy.
    model = zoo.load(saved)
    dm = GraphDataModule.from_saved(saved, root=str(medmnist_dir), cache_dir=None)
    dm.setup()
    with torch.no_grad():
        pred = model(dm.graph).argmax(1)[dm.graph.test_mask]
    assert float((pred == dm.labels("test")).float().mean()) == pytest.approx(flat["xnode/acc"], abs=1e-6)
    assert "## Graph recipe" in (saved / "card.md").read_text()


def test_graph_model_on_image_data_gets_the_knn_image_graph(medmnist_dir, tmp_path):
    # `python train.py model=xnode data=pneumoniamnist` must work as typed: the image datamodule
    # becomes the graph's node source (no training here: only the wiring is checked).
    from conftest import compose

    from zoo.training import build_datamodule

    cfg = compose(["data=breastmnist", "model=xnode", f"data.root={medmnist_dir}"], tmp_path / "run")
    dm = build_datamodule(cfg)
    assert isinstance(dm, GraphDataModule)
    assert dm.name == "breastmnist" and dm.num_classes == 2
    assert dm.recipe["image_kwargs"]["image_size"] == 28
    image_dm = build_datamodule(compose(["data=breastmnist", "model=cnn", f"data.root={medmnist_dir}"],
                                        tmp_path / "run2"))
    assert not isinstance(image_dm, GraphDataModule)
