"""X-Node's rows in a run's table (``report_rows``), on the test split of the graph:

decoder R² of the model's own explanation vector against a shuffled-context control decoder (and a
real-context probe trained the same way), PyG fidelity fid+ / fid− / characterisation of the own
explanation, and the mean |Δp| when each context cue is ablated (zoo.metrics.graphs).
"""

from __future__ import annotations

from zoo.metrics import graphs as GM


def graph_rows(model, datamodule, max_nodes: int = 256) -> dict[str, dict[str, float]]:
    """One row ``"<name> (node-context)"`` (it enters the model card); `max_nodes` test nodes for fidelity."""
    datamodule.setup("test")
    data = datamodule.graph.to(model.device)
    train, test = data.train_mask, data.test_mask
    control = GM.control_decoder_r2(model, data, train, test)
    row = {"decoder_r2": GM.decoder_r2(model, data, test), "control_r2_shuffled": control["shuffled"],
           "probe_r2_real": control["real"]}
    row.update(GM.pyg_fidelity(model, data, test.nonzero().squeeze(1)[:max_nodes]))
    for cue, values in GM.context_ablation_fidelity(model, data, test).items():
        row[f"ablate_{cue}_dp"] = values["mean_abs_dp"]
    return {f"{model.model_name} ({model.explanation_kind})": row}
