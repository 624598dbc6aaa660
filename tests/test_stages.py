"""Training stages (a base learner on image batches, then a meta learner on episodes), base-class
labels, and the method identity and metadata declared with a method: the engine for BAM-shaped
methods (issue 32), exercised through a plugin method of that shape (tests/two_stage_method.py)."""

from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest
import torch
import yaml
from helpers import cli, one_line_error

from fsbench.benchmarks.grid.files import parse_grid
from fsbench.benchmarks.grid.recipes import TrainConfig
from fsbench.benchmarks.training.plan import image_plan
from fsbench.benchmarks.training.train import train
from fsbench.core import FsbenchError
from fsbench.datasets.episodes import EpisodeLoader, EpisodeSpec
from fsbench.datasets.protocols import get_protocol
from fsbench.methods import METHODS

PANET = get_protocol("panet")


@pytest.fixture
def two_stage():
    import two_stage_method  # registers two_stage (tests/ is on the path, as a plugin)

    return two_stage_method.TwoStage


def _staged(**overrides) -> TrainConfig:
    stages = [
        {"name": "base", "steps": 3, "params": ["base"], "sampler": "images", "lr": 0.05},
        {"name": "meta", "steps": 4, "params": ["meta"], "lr_schedule": "constant"},
    ]
    return TrainConfig.from_dict({"seed": 2, "log_every": 1, "stages": stages, **overrides})


def _train(dataset, cls, cfg, **kwargs):
    torch.manual_seed(0)
    model = cls(base_classes=len(dataset.train_classes(0)))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    return model, before, train(model, dataset, PANET, 0, 1, 1, cfg, 32, **kwargs)


def test_each_stage_trains_its_groups_on_its_own_sampler(dataset, two_stage):
    model, before, result = _train(dataset, two_stage, _staged(images_per_step=4))
    assert [s[:2] for s in model.seen] == [("base", "images")] * 3 + [("meta", "episode")] * 4
    assert all(base and not meta for stage, _, base, meta in model.seen if stage == "base")
    assert all(meta and not base for stage, _, base, meta in model.seen if stage == "meta")
    after = result.state_dict
    assert not torch.equal(after["base.weight"], before["base.weight"])  # trained in "base"
    assert not torch.equal(after["meta.weight"], before["meta.weight"])  # trained in "meta"
    assert all(p.requires_grad for p in model.parameters())  # restored after training
    assert [p["stage"] for p in result.curve] == [0, 0, 0, 1, 1, 1, 1]
    assert [p["step"] for p in result.curve] == list(range(1, 8))
    # each stage's own optimizer and schedule: base at its lr, meta at the config's constant lr
    assert result.curve[0]["lr"] == pytest.approx(0.05) and result.curve[-1]["lr"] == 1e-3
    assert result.stages == [
        {"name": "base", "steps": 3, "params": ["base"], "sampler": "images"},
        {"name": "meta", "steps": 4, "params": ["meta"], "sampler": "fsbench"},
    ]


def test_a_training_killed_mid_stage_resumes_bit_equal(dataset, two_stage, tmp_path):
    cfg = _staged()
    _, _, reference = _train(dataset, two_stage, cfg)
    for kill_at in (3, 6):  # in the first stage's last step's wake, and mid-way through "meta"
        resume = tmp_path / f"resume{kill_at}.pt"

        def crash(step, steps, kill_at=kill_at):
            if step == kill_at:
                raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):
            _train(dataset, two_stage, cfg, resume_path=resume, checkpoint_every=1, progress=crash)
        assert torch.load(resume, weights_only=False)["step"] == kill_at
        _, _, resumed = _train(dataset, two_stage, cfg, resume_path=resume, checkpoint_every=1)
        assert resumed.resumed_from == kill_at
        assert all(torch.equal(reference.state_dict[k], v) for k, v in resumed.state_dict.items())
        assert resumed.curve == reference.curve


def test_validation_selects_within_the_last_stage(dataset, two_stage):
    cfg = _staged(val_classes=2, val_every=2, val_episodes=3)
    _, _, result = _train(dataset, two_stage, cfg)
    assert [v["step"] for v in result.validation] == [5, 7]  # meta's local steps 2 and 4
    assert result.best_step in (5, 7)


def test_base_class_labels_follow_the_fold_classes_and_the_augmentation(dataset):
    base = sorted(dataset.train_classes(0))
    loader = EpisodeLoader(dataset, 32, base_classes=base)
    image_id = sorted(dataset.class_images("trainaug", base[0]))[0]
    classes = [base[0]]
    episode = loader.load(EpisodeSpec(tuple(classes), (), (image_id,)))
    masks, void = dataset.load_masks(image_id, base)
    labels = episode.query_base_labels[0]
    assert set(labels.unique().tolist()) <= set(range(len(base) + 1)) | {255}
    # every base class present in the image is labelled with its 1-based rank in `base`
    for index, mask in enumerate(masks):
        if mask.sum() > 200:
            assert (labels == index + 1).any()
    # under PFENet's augmentation (raw pixels: scale, rotate, crop) labels move with the image
    from fsbench.datasets.augment import AUGMENTATIONS

    augmentation = AUGMENTATIONS.build("pfenet")
    params = (augmentation.draw(np.random.default_rng(3)),)
    moved = loader.load(EpisodeSpec(tuple(classes), (), (image_id,)), (augmentation, params))
    episode_fg = moved.query_labels[0] == 1
    assert torch.equal(moved.query_base_labels[0][episode_fg].unique(), torch.tensor([1]))
    assert torch.equal(moved.query_labels[0] == 255, moved.query_base_labels[0] == 255)


def test_image_batches_see_each_image_once_per_epoch(dataset):
    base = sorted(dataset.train_classes(0))
    pool = sorted(set().union(*(dataset.class_images("trainaug", c) for c in base)))
    per_step = 5
    steps = -(-3 * len(pool) // per_step)  # at least three epochs
    cfg = TrainConfig(steps=steps, images_per_step=per_step, seed=1, flip=False)
    plan = image_plan(dataset, "trainaug", base, cfg)
    drawn = [i for step in plan for i in step.ids]
    for epoch in range(3):
        assert sorted(drawn[epoch * len(pool) : (epoch + 1) * len(pool)]) == pool
    assert drawn[: len(pool)] != drawn[len(pool) : 2 * len(pool)]  # reshuffled per epoch
    assert plan == image_plan(dataset, "trainaug", base, cfg)  # seeded: resumable
    other = image_plan(dataset, "trainaug", base, TrainConfig(steps=steps, images_per_step=5))
    assert [s.ids for s in other] != [s.ids for s in plan]


@pytest.mark.slow  # runs a whole grid
def test_stages_in_a_grid_default_stages_ids_and_config(voc_root, two_stage, capsys, tmp_path):
    grid = {
        "name": "staged",
        "imports": ["two_stage_method"],
        "dataset": {"name": "pascal5i", "data_root": str(voc_root)},
        "input_size": 32,
        "episodes": 2,
        "seeds": [1],
        "folds": [0],
        "shots": [1],
        "methods": [{"name": "two_stage", "kwargs": {"base_classes": 15}}],
        "train": {"steps": 5, "lr_milestones": [3]},
    }
    (cell,) = parse_grid(grid).expand()
    names = [n for n, _, _ in cell.train.stage_configs()]
    assert names == ["base", "meta"]  # the class's default_stages()
    assert cell.settings().method_version == "1"
    override = dict(grid, train={"steps": 5, "stages": [{"name": "only", "steps": 2}]})
    (other,) = parse_grid(override).expand()
    assert [n for n, _, _ in other.train.stage_configs()] == ["only"] and other.id != cell.id
    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump(grid))
    code, out, err = cli(capsys, "config", path)
    assert code == 0 and "train+eval [base 3 → meta 4 steps]" in out, err
    assert "Two-stage (test)" in out  # the display name declared at registration
    results = tmp_path / "r"
    code, out, err = cli(capsys, "run", path, "--serial", "--no-tracking", "--results", results)
    assert code == 0, err
    (record,) = list((results / "staged" / "cells").glob("*.json"))
    saved = yaml.safe_load(record.read_text())
    assert [s["name"] for s in saved["train"]["stages"]] == ["base", "meta"]
    assert saved["method_display"] == "Two-stage (test)"
    assert "Two-stage (test)" in (results / "staged" / "report" / "table_miou.md").read_text()


@pytest.mark.parametrize(
    "stages, says",
    [
        ([{"name": "a", "steps": 2}, {"name": "a", "steps": 3}], "stage names ['a', 'a'] repeat"),
        ([{"name": "a", "steps": 0}], "steps=0"),
        ([{"name": "a", "steps": 2, "seed": 3}], "unknown key(s) ['seed']"),
        ([{"name": "a", "steps": 2, "params": 5}], "params 5 is not a list"),
        ([{"steps": 2}], "a stage is a mapping with a `name:`"),
        ([], "expected a list of stages"),
    ],
)
def test_impossible_stages_are_one_line(quick_grid, capsys, tmp_path, stages, says):
    override = "train.stages=" + yaml.safe_dump(stages, default_flow_style=True).strip()
    code, _, err = cli(capsys, "run", quick_grid, override, "--results", tmp_path)
    assert code == 2 and one_line_error(err, says), err


def test_a_stage_naming_a_group_the_method_lacks_is_one_line(dataset, two_stage):
    cfg = TrainConfig.from_dict({"stages": [{"name": "x", "steps": 1, "params": ["head"]}]})
    with pytest.raises(FsbenchError, match=r"stage x trains parameter group\(s\) \['head'\]"):
        _train(dataset, two_stage, cfg)


def test_without_stages_nothing_changes(dataset):
    """The same episodes, weights and curve as the one-stage loop always gave (the recorded
    cell ids are checked by test_recipes against tests/fixtures/cell_ids.json)."""
    cfg = TrainConfig(steps=4, lr_milestones=(3,), log_every=2, seed=1)
    torch.manual_seed(0)
    result = train(METHODS.get("test_panet")(), dataset, PANET, 0, 1, 1, cfg, 32)
    assert "stage" not in result.curve[0] and result.stages == []
    assert cfg.to_dict() == TrainConfig.from_dict(cfg.to_dict()).to_dict()
    assert "stages" not in cfg.to_dict()


def test_registration_metadata_and_aliases(two_stage):
    assert METHODS.display("two_stage") == "Two-stage (test)"
    assert METHODS.get("two_stage_old") is METHODS.get("two_stage")
    assert METHODS.display("finetune_linear") == "Linear probe"
    assert "finetune_linear" not in METHODS.list()  # a former name, not a listed method
    with pytest.raises(FsbenchError, match="registered twice"):
        METHODS.register("again", aliases=["two_stage_old"])(lambda: None)


# -- shared trained parts: init_from -----------------------------------------------------------
def _init_grid(voc_root, extra=()):
    meta_only = {"stages": [{"name": "meta", "steps": 3, "params": ["meta"]}]}
    return {
        "name": "shared",
        "imports": ["two_stage_method"],
        "dataset": {"name": "pascal5i", "data_root": str(voc_root)},
        "input_size": 32,
        "episodes": 2,
        "seeds": [1],
        "folds": [0],
        "shots": [1, 5],
        "methods": [
            {"name": "base_learner", "label": "base", "kwargs": {"base_classes": 15}},
            {
                "name": "two_stage",
                "init_from": "base",
                "kwargs": {"base_classes": 15},
                "train": meta_only,
            },
            *extra,
        ],  # fmt: skip
        "train": {"steps": 5, "lr_milestones": [3], "log_every": 1},
    }


@pytest.mark.slow  # runs a whole grid
def test_init_from_trains_the_base_learner_once_and_hands_it_over(voc_root, two_stage, tmp_path):
    from fsbench.benchmarks.cli.api import run
    from fsbench.benchmarks.execution.graph import job_graph
    from fsbench.benchmarks.execution.planning import plan_grid
    from fsbench.benchmarks.store.results import ResultStore

    grid = _init_grid(voc_root)
    cells = parse_grid(grid).expand()
    base = [c for c in cells if c.method.row() == "base"]
    meta = [c for c in cells if c.method.row() == "two_stage"]
    assert len({c.model_key() for c in base}) == 1  # image batches only: one model for 1/5-shot
    assert {c.settings().init_from for c in meta} == {base[0].model_key()}
    alone = dict(grid, methods=[dict(grid["methods"][1], init_from=None)])
    alone["methods"][0].pop("init_from")
    assert {c.id for c in parse_grid(alone).expand()}.isdisjoint(c.id for c in meta)
    store = ResultStore(tmp_path / "r", "shared")
    plan = plan_grid(parse_grid(grid), store)
    graph = job_graph(plan.jobs)
    trains = [n for n in graph if n.kind == "train"]
    assert [n.job.key for n in trains][0] == base[0].model_key()  # the upstream first
    assert all(n.needs == base[0].model_key() for n in trains[1:])
    run(grid, results=tmp_path / "r", serial=True, tracking=False)
    records = [yaml.safe_load(p.read_text()) for p in store.cells_dir.glob("*.json")]
    downstream = [r for r in records if r["config"]["method"] == "two_stage"]
    assert len(records) == 4 and {r["train"]["init_from"] for r in downstream} == {
        base[0].model_key()
    }
    upstream = torch.load(store.checkpoints_dir / f"{base[0].model_key()}.pt")
    for record in downstream:  # the meta stage left the handed-over base learner untouched
        trained = torch.load(store.grid_dir / record["checkpoint"])
        assert torch.equal(trained["encoder.weight"], upstream["encoder.weight"])
        assert torch.equal(trained["base.weight"], upstream["base.weight"])
    # a later run with another entry starting from it: the base learner is not trained again
    more = _init_grid(voc_root, [dict(grid["methods"][1], label="two_stage_b", kwargs={
        "base_classes": 15, "channels": 8})])  # fmt: skip
    plan = plan_grid(parse_grid(more), store)
    assert [j.key for j in plan.jobs if j.trainable] != [] and all(
        j.key != base[0].model_key() for j in plan.jobs
    )
    for job in (j for j in plan.jobs if j.trainable):  # two_stage_b, 1- and 5-shot
        assert job.upstream is None and job.config["init_from_model"]["checkpoint"].endswith(
            f"{base[0].model_key()}.pt"
        )
    run(more, results=tmp_path / "r", serial=True, tracking=False)
    assert len(list(store.cells_dir.glob("*.json"))) == 6


@pytest.mark.parametrize(
    "methods, says",
    [
        ([{"name": "test_panet", "init_from": "nope"}], "init_from 'nope' is no entry"),
        ([{"name": "test_panet", "init_from": "test_panet"}], "names the entry itself"),
        (
            [
                {"name": "test_panet", "init_from": "test_panet_nopar"},
                {"name": "test_panet_nopar", "init_from": "test_panet"},
            ],
            "init_from runs in a cycle: test_panet → test_panet_nopar → test_panet",
        ),
        (
            [{"name": "test_panet", "init_from": "all_background"}, "all_background"],
            "names an entry without a model",
        ),
    ],
)
def test_impossible_init_from_is_one_line(quick_grid, capsys, tmp_path, methods, says):
    grid = yaml.safe_load(quick_grid.read_text())
    grid["methods"] = methods
    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump(grid))
    code, _, err = cli(capsys, "config", path)
    assert code == 2 and one_line_error(err, says), err


@pytest.mark.slow  # starts a local Ray instance
def test_init_from_on_ray_equals_serial(voc_root, two_stage, tmp_path):
    """On Ray the base learner's weights reach the trainings that start from it as an object
    reference (the task graph waits on it); the numbers equal the serial run's."""
    from fsbench.benchmarks.cli.api import run

    grid = _init_grid(voc_root)
    serial = run(grid, results=tmp_path / "s", serial=True, tracking=False)
    on_ray = run(grid, results=tmp_path / "r", serial=False, tracking=False, num_cpus=2)
    columns = ["row", "shot", "seed", "miou"]
    ordered = [frame[columns].sort_values(columns[:3]).reset_index(drop=True)
               for frame in (serial, on_ray)]  # fmt: skip
    assert len(ordered[0]) == 4 and ordered[0].equals(ordered[1])


@pytest.mark.slow  # runs a whole grid
def test_a_new_method_version_recomputes_and_says_so(voc_root, two_stage, tmp_path, monkeypatch):
    from fsbench.benchmarks.cli.api import run

    grid = dict(_init_grid(voc_root), shots=[1])
    grid["methods"] = [{"name": "two_stage", "kwargs": {"base_classes": 15}}]
    run(grid, results=tmp_path / "r", serial=True, tracking=False)
    monkeypatch.setattr(two_stage, "version", "2")  # an edit of the method's code
    (cell,) = parse_grid(grid).expand()
    assert cell.settings().method_version == "2"
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        run(grid, results=tmp_path / "r", serial=True, tracking=False)
    lines = [line for line in err.getvalue().splitlines() if "another version" in line]
    assert lines == [
        "fsbench: two_stage: finished cells were computed by another version of its code "
        "(1 by version 1); this is version 2, so they are recomputed"
    ]
    assert len(list((tmp_path / "r" / "shared" / "cells").glob("*.json"))) == 2
