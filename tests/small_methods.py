"""Test-only variants of the bundled methods: tiny widths and few steps, so the suite trains and
evaluates in seconds. The package does not register them; tests/conftest.py names this module in
$FSBENCH_PLUGINS, which every process imports (the test process, CLI subprocesses, Ray workers)."""

from fsbench.methods.bam import BAM, bam
from fsbench.methods.bounds import ConstantPrediction, all_background, all_foreground
from fsbench.methods.canet import CANet, canet
from fsbench.methods.finetune import Finetune, LinearProbe, finetune, linear_probe
from fsbench.methods.gf_sam import GFSAM, gf_sam
from fsbench.methods.hdmnet import HDMNet, hdmnet
from fsbench.methods.hsnet import HSNet, hsnet
from fsbench.methods.matcher import Matcher, matcher
from fsbench.methods.panet import PANet, UntrainedPANet, panet, panet_nopar, prototype_notrain
from fsbench.methods.patnet import PATNet, patnet
from fsbench.methods.persam import PerSAM, PerSAMF, persam, persam_f
from fsbench.methods.pfenet import PFENet, pfenet
from fsbench.methods.pspnet import PSPNetBase, pspnet_base
from fsbench.methods.registry import METHODS
from fsbench.methods.sgone import SGOne, sgone

TEST_WIDTH = 1 / 16


@METHODS.register()
def test_panet(**kwargs) -> PANet:
    return panet(**{"width": TEST_WIDTH, **kwargs})


@METHODS.register()
def test_panet_nopar(**kwargs) -> PANet:
    return panet_nopar(**{"width": TEST_WIDTH, **kwargs})


@METHODS.register()
def test_prototype_notrain(**kwargs) -> UntrainedPANet:
    return prototype_notrain(**{"width": TEST_WIDTH, **kwargs})


@METHODS.register()
def test_sgone(**kwargs) -> SGOne:
    return sgone(**{"width": TEST_WIDTH, **kwargs})


@METHODS.register()
def test_canet(**kwargs) -> CANet:
    return canet(**{"blocks": (1, 1, 1), "channels": 16, "iterations": 2, **kwargs})


@METHODS.register(aliases=["test_finetune_linear"])
def test_linear_probe(**kwargs) -> LinearProbe:
    return linear_probe(**{"width": TEST_WIDTH, "steps": 5, **kwargs})


@METHODS.register()
def test_finetune(**kwargs) -> Finetune:
    return finetune(**{"width": TEST_WIDTH, "steps": 5, **kwargs})


@METHODS.register()
def test_all_background() -> ConstantPrediction:
    return all_background()


@METHODS.register()
def test_all_foreground() -> ConstantPrediction:
    return all_foreground()


@METHODS.register()
def test_hsnet(**kwargs) -> HSNet:
    return hsnet(**{"blocks": (1, 1, 1, 1), **kwargs})


@METHODS.register()
def test_pfenet(**kwargs) -> PFENet:
    return pfenet(**{"blocks": (1, 1, 1, 1), "reduce_dim": 16, "ppm_scales": (1.0, 0.5), **kwargs})


@METHODS.register()
def test_pspnet_base(**kwargs) -> PSPNetBase:
    return pspnet_base(**{"blocks": (1, 1, 1, 1), **kwargs})


@METHODS.register()
def test_bam(**kwargs) -> BAM:
    return bam(**{"blocks": (1, 1, 1, 1), "reduce_dim": 16, **kwargs})


@METHODS.register()
def test_hdmnet(**kwargs) -> HDMNet:
    return hdmnet(**{"blocks": (1, 1, 1, 1), **kwargs})


@METHODS.register()
def test_patnet(**kwargs) -> PATNet:
    return patnet(**{"blocks": (1, 1, 1, 1), **kwargs})


# The foundation-model methods with random weights at a small size (SAM's side 256, few prompts)
FOUNDATION_TINY = {"sam": "tiny", "dinov2": "tiny", "sam_weights": "random",
                   "dinov2_weights": "random"}  # fmt: skip
SAM_TINY = {"sam": "tiny", "sam_weights": "random", "sam_image_size": 256}
SMALL_KWARGS = {
    "gf_sam": {**FOUNDATION_TINY, "sam_image_size": 256, "max_points": 4},
    "persam": SAM_TINY,
    "persam_f": {**SAM_TINY, "steps": 20},
    "matcher": {
        **FOUNDATION_TINY,
        "sam_image_size": 256,
        "points_per_side": 2,
        "max_sample_iterations": 2,
    },  # fmt: skip
}


@METHODS.register()
def test_gf_sam(**kwargs) -> GFSAM:
    return gf_sam(**{**SMALL_KWARGS["gf_sam"], **kwargs})


@METHODS.register()
def test_persam(**kwargs) -> PerSAM:
    return persam(**{**SMALL_KWARGS["persam"], **kwargs})


@METHODS.register()
def test_persam_f(**kwargs) -> PerSAMF:
    return persam_f(**{**SMALL_KWARGS["persam_f"], **kwargs})


@METHODS.register()
def test_matcher(**kwargs) -> Matcher:
    return matcher(**{**SMALL_KWARGS["matcher"], **kwargs})
