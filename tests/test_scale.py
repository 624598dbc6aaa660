"""The cluster-scale benchmark at CI size: a real 2-node Ray cluster with declared GPUs, the
stand-in method, a node killed halfway; nothing lost, nothing duplicated, MLflow truthful."""

import shutil

import pytest

pytestmark = pytest.mark.slow


def test_scale_benchmark_survives_a_node_loss(tmp_path, capsys):
    if not shutil.which("ray"):
        pytest.fail("the `ray` command is missing: pip install -e .")
    from fsbench.benchmarks.tools.scale import main

    args = ["--nodes", "2", "--gpus-per-node", "2", "--cells", "16", "--eval-gpus", "0.5"]
    args += ["--steps", "2", "--step-seconds", "0.3", "--kill-node", "--out", str(tmp_path)]
    (result,) = main(args)
    out = capsys.readouterr().out
    assert result["gpus"] == 4 and result["node_killed"]
    assert result["cells"] == result["written"] == 16 and result["failed"] == 0
    assert result["lost"] == 0 and result["duplicated"] == 0
    assert result["mlflow_runs"] == 16 and result["unfinished_runs"] == 0
    assert result["encodings_per_image"] == pytest.approx(1.0)  # each image once per model
    assert 0 < result["utilisation"] <= 1.0 and result["ideal_s"] > 0
    assert result["tracking"] == "sqlite" and result["lag_s"] >= 0
    assert (tmp_path / "scale.png").is_file()
    assert (tmp_path / "sqlite" / "scale_16" / "report").is_dir()
    last = out.strip().splitlines()[-1]
    assert last.startswith("sqlite: 16 cells, makespan ") and last.endswith("lost 0, duplicated 0")


def test_standin_durations_are_seeded_and_unequal():
    from fsbench.benchmarks.tools.standin import durations

    assert durations(3, 1.0, 0.1, 0.3) == durations(3, 1.0, 0.1, 0.3)
    assert durations(3, 1.0, 0.1, 0.3) != durations(4, 1.0, 0.1, 0.3)
    assert durations(3, 1.0, 0.1, 0.0) == (1.0, 0.1)


def test_gpu_shaped_requests_are_grid_values(small_grid_dict):
    from fsbench.benchmarks.execution.executors import RayExecutor
    from fsbench.benchmarks.grid.files import parse_grid
    from fsbench.core import FsbenchError

    grid = parse_grid({**small_grid_dict, "train_gpus": 2, "eval_gpus": 0.25})
    assert (grid.train_gpus, grid.eval_gpus) == (2, 0.25)
    executor = RayExecutor(eval_gpu_fraction=grid.eval_gpus, train_gpus=grid.train_gpus)

    class Cluster:  # what ray.cluster_resources() reports
        def __init__(self, gpus):
            self.gpus = gpus

        def cluster_resources(self):
            return {"CPU": 8, "GPU": self.gpus}

    executor.ray = Cluster(8)
    assert executor.resources() == {
        "train": {"num_gpus": 2, "num_cpus": 1},
        "eval": {"num_gpus": 0.25, "num_cpus": 1},
    }
    executor.ray = Cluster(0)  # CPU-only work asks for no GPU
    assert "num_gpus" not in executor.resources()["train"]
    with pytest.raises(FsbenchError, match="eval_gpus"):
        parse_grid({**small_grid_dict, "eval_gpus": 1.5})
