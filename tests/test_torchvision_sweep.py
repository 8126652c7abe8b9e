"""Every torchvision classification model through the whole chain at full rank.

trace -> cost_model -> decompose_conv -> insert_gates -> strip_gates(0) -> fold_or_restore must
keep the function (float32, REL_CHAIN_FLOAT32), never add MACs, leave a well-formed graph without
gates, and decompose something wherever there is a non-depthwise Conv2d.
"""

import gc

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torchvision

import fxtucker
from fxtucker.meta import DECOMPOSED, LayerRecord
from fxtucker.passes import Gate
from tests.conftest import REL_CHAIN_FLOAT32, reference, rel_error

MODELS = torchvision.models.list_models(module=torchvision.models)

# The smallest input each model accepts, but at least 64: after a stride of 32 that leaves 2x2
# maps, where every tap of a padded 3x3 kernel meets data, so a wrong tap cannot hide.
DEFAULT_SIZE = 64
INPUT_SIZE = {
    "inception_v3": 75,  # its stem and reduction blocks need 75x75
    "maxvit_t": 224,  # its grid and window partitions are built for 224 / 32 = 7
    # ViT checks that the input is exactly image_size (224): its position embedding is fixed.
    **{name: 224 for name in MODELS if name.startswith("vit_")},
}

# Random weights for which the logits hardly depend on the input, so the comparison could not
# fail: googlenet and inception_v3 (trunc_normal std 0.01 / 0.1 convs under BatchNorm in eval mode:
# the signal dies and the logits are the classifier's bias) and shufflenet (default conv init: the
# input moves the logits by 1e-4 of their norm). ViT zero-initialises its head: logits are 0.
REVIVED_INIT = {
    "googlenet", "inception_v3", *(n for n in MODELS if n.startswith(("shufflenet_", "vit_")))
}
# The part of the reference output that depends on the input must be at least this fraction of it.
MIN_INPUT_DEPENDENCE = 1e-2

# The default run: the cheapest model of each family (~1-4 s each on one free core, ~25 s in all),
# with resnet18, densenet121, mobilenet_v2 and convnext_tiny always in. Every other model, and any
# that torchvision adds later, is marked slow: the heaviest (regnet_y_128gf, ~4 min, ~13 GB) and
# vit_h_14 (~1 min, ~13 GB) included.
DEFAULT_RUN = {
    "alexnet", "convnext_tiny", "densenet121", "efficientnet_b0", "googlenet", "inception_v3",
    "mnasnet0_5", "mobilenet_v2", "mobilenet_v3_small", "regnet_x_400mf", "regnet_y_800mf",
    "resnet18", "shufflenet_v2_x0_5", "squeezenet1_0", "squeezenet1_1", "swin_t", "swin_v2_t",
    "vit_b_32",
}  # fmt: skip

# Models that cannot be traced or do not survive the chain, as name -> the precise reason; they
# run as strict xfails. None with torch 2.14 and torchvision 0.29: all of them trace and pass.
KNOWN_FAILURES: dict[str, str] = {}

EXPECTED_WARNING = r"ignore:decompose_conv left \d+ layer\(s\) as they are:UserWarning"


def _marks(name: str) -> list:
    marks = []
    if name not in DEFAULT_RUN:
        marks.append(pytest.mark.slow)
    if name in KNOWN_FAILURES:
        marks.append(pytest.mark.xfail(strict=True, reason=KNOWN_FAILURES[name]))
    return marks


def revive(model: nn.Module) -> None:
    """Fan-in Kaiming weights for every conv (depthwise too) and normal ones for a zero head."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
        elif isinstance(m, nn.Linear) and not m.weight.any():
            nn.init.normal_(m.weight, std=0.01)


def build(name: str) -> tuple[nn.Module, torch.Tensor]:
    """The model with random weights in eval mode, and one random image it accepts."""
    # init_weights=False skips googlenet's and inception_v3's own init, which revive replaces.
    kwargs = {"init_weights": False} if name in ("googlenet", "inception_v3") else {}
    model = torchvision.models.get_model(name, weights=None, **kwargs)
    if name in REVIVED_INIT:
        revive(model)
    size = INPUT_SIZE.get(name, DEFAULT_SIZE)
    return model.eval(), torch.randn(1, 3, size, size)


def has_decomposable_conv(model: nn.Module) -> bool:
    """Whether ``model`` holds an nn.Conv2d with more than one input channel per group."""
    return any(isinstance(m, nn.Conv2d) and m.in_channels // m.groups > 1 for m in model.modules())


def output(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


def run_chain(
    gm: fx.GraphModule, x: torch.Tensor
) -> tuple[torch.Tensor, tuple[LayerRecord, ...], fx.GraphModule]:
    """The chain at full rank: the decomposed model's output and layer records, and the final model.

    Each stage is freed as soon as the next exists: every pass makes a copy, and regnet_y_128gf
    peaks at 15 GB this way against 23 GB with all stages alive.
    """
    decomposed = fxtucker.decompose_conv(gm)
    decomposed_out, layers = output(decomposed, x), fxtucker.report(decomposed).layers
    gated = fxtucker.insert_gates(decomposed)
    del decomposed
    # A GraphModule and its Graph reference each other: only the cycle collector frees them.
    gc.collect()
    assert any(isinstance(m, Gate) for m in gated.modules())
    stripped = fxtucker.strip_gates(gated, 0.0)
    del gated
    gc.collect()
    return decomposed_out, layers, fxtucker.fold_or_restore(stripped, x)


@pytest.fixture(autouse=True)
def _free_models():
    """Free each test's models before the next builds its own (see run_chain)."""
    yield
    gc.collect()


@pytest.mark.filterwarnings(EXPECTED_WARNING)
@pytest.mark.parametrize("name", [pytest.param(n, marks=_marks(n), id=n) for n in MODELS])
def test_full_rank_chain_keeps_function(name):
    model, x = build(name)
    ref = reference(model)
    expected = output(ref, x)
    # A reference that ignores its input would make every comparison below pass.
    assert rel_error(output(ref, torch.randn_like(x)), expected) > MIN_INPUT_DEPENDENCE
    del ref

    gm = fxtucker.cost_model(fxtucker.trace(model), x)
    decomposed_out, layers, final = run_chain(gm, x)

    assert rel_error(decomposed_out, expected) < REL_CHAIN_FLOAT32
    assert rel_error(output(final, x), expected) < REL_CHAIN_FLOAT32
    assert fxtucker.count_macs(final, x) <= fxtucker.count_macs(gm, x)
    final.graph.lint()
    assert not any(isinstance(m, Gate) for m in final.modules())
    if has_decomposable_conv(model):
        assert any(r.decision == DECOMPOSED for r in layers)


def test_model_tables_name_torchvision_models():
    # A misspelt name would quietly move a model to the slow run or drop its special case.
    assert DEFAULT_RUN | set(INPUT_SIZE) | REVIVED_INIT | set(KNOWN_FAILURES) <= set(MODELS)
    assert {"resnet18", "densenet121", "mobilenet_v2", "convnext_tiny"} <= DEFAULT_RUN
