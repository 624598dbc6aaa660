"""The driver's bookkeeping, independent of the executor's delivery order."""

import json

from fsbench.benchmarks.grid import parse_grid
from fsbench.benchmarks.results import ResultStore
from fsbench.benchmarks.runner import Driver, plan_grid
from fsbench.benchmarks.tasks import eval_task, train_task


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
