"""The foundation-model track around its methods: weight files checked in one line, the
external-data mark and strict grids, the cost table, the papers' rows, and the grids at smoke
size through the CLI (as a user runs them)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from fsbench.benchmarks.cli.main import main
from fsbench.benchmarks.grid.files import load_grid, parse_grid
from fsbench.benchmarks.report.tables import reported_rows
from fsbench.core import FsbenchError
from fsbench.methods.foundation import Dinov2, build_sam

CONFIGS = Path(__file__).parents[1] / "benchmarks" / "configs"
GRIDS = ["gf_sam_coco.yaml", "persam_coco.yaml", "matcher_coco.yaml", "matcher_lvis.yaml"]


def test_missing_or_mismatched_weight_files_are_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("FSBENCH_WEIGHTS", str(tmp_path))
    with pytest.raises(FsbenchError, match=r"sam_vit_h_4b8939.pth: SAM checkpoint not found"):
        build_sam("vit_h")
    vit_b = {"image_encoder.patch_embed.proj.weight": torch.zeros(768, 3, 16, 16)}
    vit_b.update({f"image_encoder.blocks.{i}.norm1.weight": torch.ones(768) for i in range(12)})
    torch.save(vit_b, tmp_path / "sam_vit_h_4b8939.pth")
    with pytest.raises(FsbenchError, match=r"SAM vit_b checkpoint, the method asks for SAM vit_h"):
        build_sam("vit_h")
    torch.save({"pos_embed": torch.zeros(1, 1370, 384)}, tmp_path / "small.pth")
    with pytest.raises(FsbenchError, match=r"small.pth: a DINOv2 vit_small checkpoint"):
        Dinov2("tiny", tmp_path / "small.pth")
    with pytest.raises(FsbenchError, match=r"SAM size 'vit_x'"):
        build_sam("vit_x", "random")


def test_reported_rows_of_the_foundation_track_carry_the_dagger():
    frame = pd.DataFrame([{"dataset": "coco20i", "protocol": "matcher", "annotation": "mask",
                           "way": 1}])  # fmt: skip
    columns = [("1-shot", f"Fold-{f}") for f in range(4)] + [("1-shot", "Mean")]
    rows = reported_rows(frame, "miou", columns)
    gf_sam = rows.loc[next(i for i in rows.index if i.startswith("GF-SAM†"))]
    assert list(gf_sam) == ["56.6", "61.4", "59.6", "57.1", "58.7"]  # its committed logs
    matcher = rows.loc[next(i for i in rows.index if i.startswith("Matcher†"))]
    assert matcher[("1-shot", "Mean")] == "52.7*"  # from the paper, not yet checked
    lvis = pd.DataFrame([{**frame.iloc[0].to_dict(), "dataset": "lvis92i"}])
    columns = [("1-shot", "Fold-0"), ("1-shot", "Mean")]
    rows = reported_rows(lvis, "miou", columns)
    row = rows.loc[next(i for i in rows.index if i.startswith("GF-SAM†") and "lvis" in i)]
    assert list(row) == ["30.9", "35.2"]


def test_strict_grids_leave_out_methods_pretrained_beyond_imagenet(capsys):
    raw = yaml.safe_load((CONFIGS / "matcher_coco.yaml").read_text())
    raw["methods"] = [*raw["methods"], "test_panet"]
    spec = parse_grid({**raw, "strict": True})
    rows = {c.method.row() for c in spec.expand()}
    assert rows == {"test_panet"}
    assert "strict: left out gf_sam (SA-1B, LVD-142M), persam (SA-1B)" in capsys.readouterr().err
    with pytest.raises(FsbenchError, match="strict: true leaves no method"):
        parse_grid({**yaml.safe_load((CONFIGS / "gf_sam_coco.yaml").read_text()),
                    "strict": True}).expand()  # fmt: skip
    with pytest.raises(FsbenchError, match="strict: 'yes' is not true or false"):
        parse_grid({**raw, "strict": "yes"})


@pytest.mark.parametrize("grid", GRIDS)
def test_the_paper_settings_of_the_foundation_grids(grid):
    spec = load_grid(CONFIGS / grid)
    assert spec.protocol == "matcher" and spec.ways == (1,)
    cells = spec.expand()
    sizes = {c.method.name: c.input_size for c in cells}
    if "gf_sam" in sizes:
        assert sizes["gf_sam"] == 1024  # GF-SAM's main_eval.py --img-size
    assert sizes.get("persam", 518) == 518 and sizes.get("matcher", 518) == 518  # its --img-size
    if grid == "matcher_lvis.yaml":
        assert spec.folds == tuple(range(10))
        assert {c.episodes for c in cells} == {2300}


@pytest.mark.slow
def test_the_foundation_grids_run_at_smoke_size_with_cost_and_marks(tmp_path, capsys):
    args = ["run", str(CONFIGS / "matcher_coco.yaml"), "--smoke", "--serial", "--no-tracking"]
    assert main([*args, "--results", str(tmp_path)]) == 0, capsys.readouterr().err[-2000:]
    report = tmp_path / "matcher_coco_smoke" / "report"
    table = (report / "table_miou.md").read_text()
    assert "| GF-SAM† |" in table and "| PerSAM† |" in table
    assert (
        "pretrained on data beyond ImageNet (GF-SAM: SA-1B, LVD-142M; PerSAM: SA-1B; "
        "Matcher: SA-1B, LVD-142M)"
    ) in table
    latex = (report / "table_miou.tex").read_text()
    assert "GF-SAM$^\\dagger$ & " in latex and "pm$nan" not in latex  # one seed: no ± shown
    cost = pd.read_csv(report / "table_cost.csv")
    assert set(cost["external data"]) == {"SA-1B, LVD-142M", "SA-1B"}
    assert cost["declared cost"].str.contains("SAM ViT-H").all()
    assert (cost["parameters (M)"] > 1).all() and (cost["s / episode"] > 0).all()
    assert (cost["peak RSS (GiB)"] > 0).all()
    record = json.loads(
        next((tmp_path / "matcher_coco_smoke" / "cells").glob("*.json")).read_text()
    )
    assert record["timings"]["parameters"] > 1e6 and record["timings"]["pretraining"]


def test_sam_embeddings_spill_past_cache_bytes_and_score_the_same(tmp_path):
    # PerSAM's cached SAM embeddings (256 × 16 × 16 floats each at the test SAM's 256-px side) of
    # images that are supports and queries, kept within cache_bytes, the rest spilled to disk:
    # the same counts as all in memory
    import dataclasses

    import numpy as np

    from fsbench.benchmarks.evaluation.cache import FeatureCache
    from fsbench.benchmarks.evaluation.evaluate import evaluate_model
    from fsbench.datasets.episodes import EpisodeLoader
    from fsbench.datasets.lvis import Lvis92i
    from fsbench.datasets.manifests import EpisodeManifest
    from fsbench.datasets.protocols import resolve
    from fsbench.datasets.synthetic_lvis import write_lvis
    from fsbench.methods import METHODS

    write_lvis(tmp_path, 120, 32, 0)
    lvis = Lvis92i(tmp_path)
    protocol = dataclasses.replace(resolve("matcher", lvis), input_size=32)
    manifest = EpisodeManifest.build(lvis, protocol, 0, 1, 1, 24, 0)
    loader = EpisodeLoader(lvis, 32, resize=protocol.resize)
    torch.manual_seed(0)
    model = METHODS.get("test_persam")().eval()
    one = 256 * 16 * 16 * 4
    results = []
    for budget in (1 << 30, one):
        cache = FeatureCache(
            model, loader, "cpu", max_bytes=budget, batch_size=2, spill_bytes=1 << 30
        )
        with torch.no_grad():
            ((counts, _, _),) = evaluate_model(model, cache, [(loader, manifest, protocol)])
        results.append((counts, cache.spilled, cache.feature_bytes))
    (roomy, none, size), (tight, spilled, _) = results
    assert size == one and none == 0 and spilled > 0
    assert np.array_equal(roomy.per_class, tight.per_class)
