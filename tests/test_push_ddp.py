"""Push under DDP: 2 CPU processes (gloo, torch.multiprocessing.spawn), each searching its shard,
must return exactly the prototypes and provenance of a 1-process push — including a tie between
two identical training images that land on different ranks (the smaller dataset position wins)."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import zoo
from zoo.models.prototypes.push import push_prototypes

HPARAMS = dict(num_classes=3, in_channels=1, image_size=32, widths=(8, 16, 16), prototype_dim=8,
               prototypes_per_class=3)
FIELDS = ("prototypes", "index", "position", "location", "distance", "box", "cell")


def _dataset():
    from zoo.data import make_synthetic

    data = make_synthetic(37, num_classes=3, seed=3)  # odd size: the shards differ in length
    x, y = data["images"] * 2 - 1, data["labels"].clone()
    x[4], y[4] = x[1], y[1]  # position 1 (rank 1) and 4 (rank 0) hold the same image
    return [{"image": x[i], "label": y[i], "index": torch.tensor(1000 + i)} for i in range(len(y))]


def _model(state_path):
    model = zoo.create_model("protopnet", **HPARAMS)
    model.load_state_dict(torch.load(state_path, weights_only=True))
    return model.eval()


def _push(model, dataset):
    return push_prototypes(model.features, model.prototypes, model.prototype_class, dataset, model.distances,
                           model.similarity, image_size=32, batch_size=8, keep_images=True)


def _worker(rank: int, world_size: int, port: int, state_path: str, out_path: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        with torch.no_grad():
            result = _push(_model(state_path), _dataset())
        torch.save({f: getattr(result, f) for f in FIELDS} | {"source_images": result.source_images,
                                                             "duplicates": torch.tensor(sum(result.duplicates, []))},
                   f"{out_path}.{rank}")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_process_push_equals_one_process_push(tmp_path):
    torch.manual_seed(0)
    model = zoo.create_model("protopnet", **HPARAMS).eval()
    dataset = _dataset()
    # Make prototype 0 an exact copy of a patch of the duplicated image: a distance-0 tie across ranks.
    assert int(dataset[1]["label"]) == 0
    with torch.no_grad():
        model.prototypes[0] = model.features(dataset[1]["image"][None])[0, :, 2, 3]
    state = tmp_path / "state.pt"
    torch.save(model.state_dict(), state)

    with torch.no_grad():
        single = _push(_model(state), dataset)
    assert int(single.position[0]) == 1 and float(single.distance[0]) == 0.0  # the tie goes to position 1

    out = tmp_path / "result"
    mp.spawn(_worker, args=(2, _free_port(), str(state), str(out)), nprocs=2, join=True)
    for rank in range(2):
        got = torch.load(f"{out}.{rank}", weights_only=True)
        for f in FIELDS:
            assert torch.equal(got[f], getattr(single, f)), f"rank {rank}: {f} differs from the 1-process push"
        assert torch.equal(got["source_images"], single.source_images)
        assert got["duplicates"].tolist() == sum(single.duplicates, [])
