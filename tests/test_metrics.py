import numpy as np
import pytest

from fsbench.benchmarks.metrics import (
    EpisodeCounts,
    SegmentationMeter,
    bootstrap_ci,
    paired_bootstrap,
)

# Episode 1 (class 3): label/pred 3x4, one ignore pixel where the prediction is foreground.
LABEL_1 = np.array([[0, 0, 1, 1], [0, 255, 1, 1], [0, 0, 0, 1]])
PRED_1 = np.array([[0, 1, 1, 1], [0, 1, 0, 1], [0, 0, 0, 0]])
# fg: TP = 3 ((0,2),(0,3),(1,3)), FP = 1 ((0,1); (1,1) is ignored), FN = 2 ((1,2),(2,3))
# bg: TP = 5, FP = 2, FN = 1
# Episode 2 (class 4): the class is absent from the query label; the prediction has 2 fg pixels.
LABEL_2 = np.array([[0, 0], [0, 255]])
PRED_2 = np.array([[1, 1], [0, 1]])
# fg (class 4): TP 0, FP 2, FN 0; bg: TP 1, FP 0, FN 2


def _meter(only_present):
    meter = SegmentationMeter([1, 2, 3, 4, 5], only_present=only_present)
    meter.update(PRED_1, LABEL_1, [3])
    meter.update(PRED_2, LABEL_2, [4])
    return meter


def test_golden_counts_standard_definition():
    counts = _meter(False).counts()
    assert counts.per_class[0].tolist() == [[0, 0, 0]] * 2 + [[3, 1, 2]] + [[0, 0, 0]] * 2
    assert counts.per_class[1][3].tolist() == [0, 2, 0]
    iou = _meter(False).class_iou()
    assert iou[3] == pytest.approx(3 / 6)
    assert iou[4] == pytest.approx(0.0)  # predicted but absent: counted, IoU 0
    assert np.isnan(iou[1])  # never in an episode: left out of the mean
    assert _meter(False).miou() == pytest.approx((0.5 + 0.0) / 2)
    # FB-IoU: bg TP 6 FP 2 FN 3 → 6/11; fg TP 3 FP 3 FN 2 → 3/8
    assert _meter(False).fb_iou() == pytest.approx((6 / 11 + 3 / 8) / 2)


def test_golden_counts_panet_definition_skips_absent_classes():
    meter = _meter(True)
    assert meter.counts().per_class[1].sum() == 0  # class 4 absent → nothing recorded
    assert np.isnan(meter.class_iou()[4])
    assert meter.miou() == pytest.approx(0.5)
    # bg recorded in both (label has 0 in both): TP 6 FP 2 FN 3; fg = class rows: TP 3 FP 1 FN 2
    assert meter.fb_iou() == pytest.approx((6 / 11 + 3 / 6) / 2)


def test_nway_foreground_binary_vs_panet_sum():
    label = np.array([[1, 2], [0, 0]])
    pred = np.array([[2, 1], [0, 0]])  # the two classes swapped
    standard = SegmentationMeter([1, 2])
    standard.update(pred, label, [1, 2])
    panet = SegmentationMeter([1, 2], only_present=True)
    panet.update(pred, label, [1, 2])
    assert standard.miou() == 0.0 and panet.miou() == 0.0
    assert standard.fb_iou() == pytest.approx(1.0)  # fg vs bg is right
    assert panet.fb_iou() == pytest.approx((1.0 + 0.0) / 2)  # per-class sums: all wrong


def test_episode_grouping_sums_queries():
    meter = SegmentationMeter([3])
    meter.update(PRED_1, LABEL_1, [3], episode=0)
    meter.update(PRED_1, LABEL_1, [3], episode=0)
    assert meter.counts().per_class.shape == (1, 1, 3)
    assert meter.counts().per_class[0, 0].tolist() == [6, 2, 4]


def test_bootstrap_interval_brackets_the_estimate_and_json_roundtrip():
    rng = np.random.default_rng(0)
    meter = SegmentationMeter([1])
    for _ in range(50):
        label = (rng.random((8, 8)) > 0.5).astype(int)
        pred = np.where(rng.random((8, 8)) > 0.2, label, 1 - label)
        meter.update(pred, label, [1])
    counts = EpisodeCounts.from_json(meter.counts().to_json())
    low, high = bootstrap_ci(counts, n_boot=500)
    assert low < counts.miou() < high
    same = paired_bootstrap(counts, counts, n_boot=200)
    assert same["difference"] == 0 and not same["significant"]
    worse = SegmentationMeter([1])
    for index in range(len(counts.per_class)):
        worse.update(np.zeros((8, 8), int), np.ones((8, 8), int), [1], index)
    assert paired_bootstrap(counts, worse.counts(), n_boot=200)["significant"]


def test_episode_counts_are_stored_sparsely_and_old_dense_records_still_load():
    from fsbench.benchmarks.metrics import EpisodeCounts

    per_class = np.zeros((4, 240, 3), dtype=np.int64)
    per_class[0, 7] = (5, 1, 2)
    per_class[3, 200] = (0, 0, 9)
    counts = EpisodeCounts(list(range(761, 1001)), per_class, np.ones((4, 3)), np.ones((4, 3)))
    raw = counts.to_json()
    assert raw["per_class_sparse"] == [[0, 7, 5, 1, 2], [3, 200, 0, 0, 9]]
    again = EpisodeCounts.from_json(raw)
    assert np.array_equal(again.per_class, per_class) and again.miou() == counts.miou()
    dense = {
        **{k: v for k, v in raw.items() if k != "per_class_sparse"},
        "per_class": per_class.tolist(),
    }
    assert np.array_equal(EpisodeCounts.from_json(dense).per_class, per_class)
