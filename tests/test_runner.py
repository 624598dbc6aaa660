"""The driver's bookkeeping, independent of the executor's delivery order."""

import json

import pytest

from fsbench.benchmarks.execution.runner import Driver, plan_grid
from fsbench.benchmarks.execution.tasks import eval_task, train_task
from fsbench.benchmarks.grid.files import parse_grid
from fsbench.benchmarks.metrics import EpisodeCounts
from fsbench.benchmarks.store.results import ResultStore


def test_cell_waits_for_its_training_record_when_evaluations_arrive_first(
    tmp_path, small_grid_dict
):
    # Ray returns a training task's weights to the evaluations before the driver has necessarily
    # taken the training record (`ray.wait` may hand over the evaluation first).
    grid = parse_grid(dict(small_grid_dict, methods=[{"name": "test_panet"}]))
    store = ResultStore(tmp_path, grid.name)
    plan = plan_grid(grid, store)
    (job,) = plan.jobs
    driver = Driver(grid, store, plan, progress=False)
    info = train_task(job.config, "cpu", 1)
    state = info.pop("state_dict")
    for output in eval_task(job.config, state, job.items, "cpu", 1):
        driver.on_eval(job, output)
    assert driver.written == []  # every seed is in, but not the training record
    driver.on_train(job, info, state)
    (cell,) = plan.todo
    assert driver.written == [cell.id]
    record = json.loads(store.cell_path(cell.id).read_text())
    assert record["checkpoint"] and record["train"]["curve"]
    assert [s["seed"] for s in record["seeds"]] == list(cell.seeds)


def scored_pixels(output) -> int:
    """Every scored pixel of a 1-way evaluation: background's TP+FP+FN plus the class's TP."""
    counts = EpisodeCounts.from_json(output["counts"])
    return int(counts.background.sum() + counts.foreground[:, 0].sum())


def miou(output) -> float:
    return EpisodeCounts.from_json(output["counts"]).miou()


def test_one_eval_task_per_model_encodes_each_distinct_image_once(tmp_path, small_grid_dict):
    grid = parse_grid(dict(small_grid_dict, methods=[{"name": "test_prototype_notrain"}]))
    plan = plan_grid(grid, ResultStore(tmp_path, grid.name))
    (job,) = plan.jobs  # untrained: one model serves every seed
    outputs = eval_task(job.config, None, job.items, "cpu", 1)
    distinct = {
        i
        for item in job.items
        for e in item["manifest"]["episodes"]
        for i in (*sum(e["support"], []), *e["query"])
    }
    assert {o["encoded_images"] for o in outputs} == {len(distinct)}
    assert {o["distinct_images"] for o in outputs} == {len(distinct)}


def test_bf16_evaluation_on_cpu(tmp_path, small_grid_dict):
    grid = parse_grid(
        dict(small_grid_dict, methods=[{"name": "test_prototype_notrain"}], eval_precision="bf16")
    )
    plan = plan_grid(grid, ResultStore(tmp_path, grid.name))
    (job,) = plan.jobs
    assert job.config["eval_precision"] == "bf16"  # part of the cell's identity
    bf16 = eval_task(job.config, None, job.items, "cpu", 1)
    fp32 = eval_task({**job.config, "eval_precision": "fp32"}, None, job.items, "cpu", 1)
    assert [o["seed"] for o in bf16] == [o["seed"] for o in fp32]
    assert all(sum(map(sum, o["counts"]["background"])) > 0 for o in bf16)
    for low, full in zip(bf16, fp32):  # the same pixels are scored, to nearly the same mIoU
        assert scored_pixels(low) == scored_pixels(full)
        assert abs(miou(low) - miou(full)) < 0.05


def test_bf16_features_are_stored_as_float32(dataset):
    import torch

    from fsbench.benchmarks.evaluation.cache import FeatureCache
    from fsbench.datasets.episodes import EpisodeLoader
    from fsbench.methods import METHODS

    torch.manual_seed(0)
    model = METHODS.get("test_panet")().eval()
    ids = dataset.class_images("val", 3)[:3]
    exact = FeatureCache(model, EpisodeLoader(dataset, 32), "cpu", batch_size=4).get(ids)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = FeatureCache(model, EpisodeLoader(dataset, 32), "cpu", batch_size=4).get(ids)
    assert low.dtype == exact.dtype == torch.float32
    assert not torch.equal(low, exact) and torch.allclose(low, exact, rtol=0.1, atol=0.1)


@pytest.mark.gpu
def test_cuda_evaluation_in_bf16_and_fp32(tmp_path, small_grid_dict):
    grid = parse_grid(dict(small_grid_dict, methods=[{"name": "test_prototype_notrain"}]))
    (job,) = plan_grid(grid, ResultStore(tmp_path, grid.name)).jobs
    cpu = eval_task(job.config, None, job.items, "cpu", 1)
    cuda = eval_task(job.config, None, job.items, "cuda", 1)
    low = eval_task({**job.config, "eval_precision": "bf16"}, None, job.items, "cuda", 1)
    for a, b, c in zip(cpu, cuda, low):
        assert b["device"] != a["device"] and b["encoded_images"] == a["encoded_images"]
        assert scored_pixels(a) == scored_pixels(b) == scored_pixels(c)
        assert abs(miou(a) - miou(b)) < 0.01 and abs(miou(b) - miou(c)) < 0.05
