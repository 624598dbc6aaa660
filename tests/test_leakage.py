"""Novel-class leakage: the audit against the labels themselves, BAM's filter, the report."""

import json

import numpy as np
import pytest

from fsbench.benchmarks.grid.recipes import TrainConfig
from fsbench.datasets.leakage import (
    ShippedPascalLists,
    WithoutNovelImages,
    audit,
    novel_images,
)
from fsbench.datasets.protocols import get_protocol


def test_audit_matches_counting_the_label_pixels(dataset):
    protocol = get_protocol("panet")
    split = dataset.train_split(protocol)
    result = audit(dataset, protocol, 1)
    novel = set(dataset.fold_classes(1))
    train = set(dataset.train_classes(1))
    usable, leaking, novel_pixels, total = 0, 0, 0, 0
    for image_id in dataset.list_ids(split):
        label = dataset.load_label(image_id)
        present = set(np.unique(label).tolist())
        if not present & train:
            continue
        usable += 1
        if present & novel:
            leaking += 1
            novel_pixels += int(np.isin(label, list(novel)).sum())
            total += label.size
    assert usable > 0 and 0 < leaking < usable
    assert result["train_images"] == usable and result["with_novel_pixels"] == leaking
    assert result["novel_pixel_share"] == pytest.approx(100 * novel_pixels / total)
    assert result["share_of_images"] == pytest.approx(100 * leaking / usable)


def test_the_filter_leaves_no_novel_pixel_in_any_training_episode(dataset):
    from fsbench.benchmarks.training.plan import episode_plan

    protocol = get_protocol("panet")
    split = dataset.train_split(protocol)
    excluded = novel_images(dataset, split, 0)
    view = WithoutNovelImages(dataset, excluded)
    cfg = TrainConfig(steps=40, lr_milestones=(30,))
    plan = episode_plan(view, protocol, split, 0, dataset.train_classes(0), 1, 1, cfg)
    seen = {i for step in plan for spec, _ in step for i in (*spec.query, *spec.support[0])}
    assert seen and not seen & excluded
    novel = dataset.fold_classes(0)
    for image_id in seen:
        assert not np.isin(dataset.load_label(image_id), novel).any()
    assert view.fingerprint(split) != dataset.fingerprint(split)
    plain = episode_plan(dataset, protocol, split, 0, dataset.train_classes(0), 1, 1, cfg)
    assert {i for step in plain for spec, _ in step for i in spec.query} & excluded


def test_shipped_pascal_lists_count_images_listed_under_novel_classes():
    lists = ShippedPascalLists()
    rows = {(r["fold"], r["train_list"]): r for r in lists.rows()}
    assert len(rows) == 8
    for fold in range(4):
        hsnet, pfenet = rows[(fold, "hsnet_trn")], rows[(fold, "pfenet_noduplicate")]
        training = set().union(*(lists.pairs[f] for f in range(4) if f != fold))
        assert hsnet["train_images"] == len(training)
        assert hsnet["with_novel_pixels"] == len(training & lists.pairs[fold]) > 0
        assert pfenet["train_images"] <= hsnet["train_images"]
        assert pfenet["with_novel_pixels"] <= hsnet["with_novel_pixels"]
    assert len(lists.pfenet) == 5953  # PFENet's list, every line read


@pytest.mark.slow
def test_exclude_novel_images_in_one_grid_and_the_leakage_report(tmp_path, small_grid_dict):
    import fsbench
    from fsbench.benchmarks.report import build_report

    grid = {**small_grid_dict, "name": "bam", "seeds": [1]}
    grid["methods"] = [
        {"name": "test_panet"},
        {"name": "test_panet", "label": "test_panet_bam", "train": {"exclude_novel_images": True}},
    ]
    fsbench.run(grid, results=tmp_path, serial=True, tracking=False)
    records = [json.loads(p.read_text()) for p in (tmp_path / "bam" / "cells").glob("*.json")]
    train = {r["config"]["row"]: r["train"] for r in records}
    assert train["test_panet"]["excluded_images"] == 0
    assert train["test_panet_bam"]["excluded_images"] > 0
    prints = {row: t["train_list_fingerprint"] for row, t in train.items()}
    assert len(prints["test_panet"]) == 64 and prints["test_panet"] != prints["test_panet_bam"]
    written = build_report(tmp_path / "bam", n_boot=20)
    report = tmp_path / "bam" / "report"
    assert report / "leakage.md" in written["tables"]
    text = (report / "leakage.md").read_text()
    assert "| panet | trainaug | 0 |" in text and "| test_panet_bam | 0 | 1 |" in text
    import pandas as pd

    frame = pd.read_csv(report / "leakage.csv")
    assert sorted(frame["protocol"].unique()) == ["hsnet", "panet", "pfenet"]
    assert (frame["with_novel_pixels"] <= frame["train_images"]).all()
    excluded = train["test_panet_bam"]["excluded_images"]
    panet = frame[frame["protocol"] == "panet"].iloc[0]
    assert panet["with_novel_pixels"] == excluded  # the filter drops exactly what the audit counts


def test_the_leakage_tool_prints_the_shipped_lists_and_a_data_audit(capsys, voc_root):
    from fsbench.benchmarks.tools.leakage import main

    frame = main([])
    assert len(frame) == 8 and "leakage from the shipped lists alone" in capsys.readouterr().out
    frame = main(["--data-root", str(voc_root), "--folds", "1"])
    assert sorted(frame["protocol"]) == ["hsnet", "panet", "pfenet"]
    assert "label files" in capsys.readouterr().out
