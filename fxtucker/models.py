"""Models by name: CIFAR-style ResNets and a small VGG written here, and torchvision's classifiers.

The CIFAR models follow He et al. (2016), section 4.2: a 3x3 stem, three stages of n basic
blocks with widths 16/32/64, global average pooling and one linear layer. Downsampling
shortcuts are option B (1x1 conv + BN), which keeps every model traceable by
``torch.fx.symbolic_trace`` (option A's zero-padding slice is not a module). All of them pool
adaptively before the classifier, so 28x28 (Fashion-MNIST) and 32x32 (CIFAR) inputs both work.

Module names copy torchvision's ResNet (``conv1``, ``bn1``, ``layer1.0.conv1``, ``downsample``,
``avgpool``, ``fc``) so that graph node names read the same for both families.
``mobilenet_v2_cifar`` is torchvision's MobileNetV2 at width 0.5 with CIFAR-style strides: it
downsamples 8x instead of 32x, so a 28x28 input ends on a 4x4 map, not a 1x1 one.

:func:`get_model` also takes model specs beyond these names: ``timm:NAME`` (a timm model, without
pretrained weights), ``package.module:callable`` and ``path/to/file.py:callable`` (the user's own
factory), each with optional keyword arguments.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import importlib.util
import inspect
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch
import torchvision
from torch import nn

__all__ = [
    "BasicBlock",
    "CifarResNet",
    "VGGSmall",
    "mobilenet_v2_cifar",
    "CIFAR_MODELS",
    "get_model",
    "list_models",
    "model_label",
]


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity or 1x1 conv-BN (option B) shortcut."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample: Optional[nn.Sequential] = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Residual block: relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))."""
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class CifarResNet(nn.Module):
    """CIFAR ResNet of depth 6n + 2 (He et al. 2016): widths 16/32/64, option-B shortcuts.

    Args:
        depth: 6n + 2 for n >= 1 (20, 32, 44, 56, 110, ...).
        num_classes: outputs of the final linear layer.
        in_channels: channels of the input image (1 for Fashion-MNIST, 3 for CIFAR).
    """

    def __init__(self, depth: int, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        if not isinstance(depth, int) or depth < 8 or (depth - 2) % 6 != 0:
            raise ValueError(
                f"CifarResNet depth must be 6n + 2 with n >= 1 (20, 32, 44, 56, ...), got {depth!r}"
            )
        n = (depth - 2) // 6
        self.depth = depth
        self.conv1 = nn.Conv2d(in_channels, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(16, 16, n, stride=1)
        self.layer2 = self._make_layer(16, 32, n, stride=2)
        self.layer3 = self._make_layer(32, 64, n, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @staticmethod
    def _make_layer(in_planes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
        """A stage of ``blocks`` basic blocks; only the first one strides."""
        layers = [BasicBlock(in_planes, planes, stride)]
        layers += [BasicBlock(planes, planes, 1) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Stem, three stages, global average pool, linear classifier."""
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)

    def extra_repr(self) -> str:
        """Show the depth."""
        return f"depth={self.depth}"


# Channels of each conv-BN-ReLU layer; "M" is a 2x2 max pool. About 0.15 GMAC at 32x32.
_VGG_SMALL_CFG = (64, 64, "M", 128, 128, "M", 256, 256, "M")


class VGGSmall(nn.Module):
    """VGG-style plain CNN for 28x28 and 32x32 inputs: six 3x3 conv-BN-ReLU layers, three pools.

    Args:
        num_classes: outputs of the final linear layer.
        in_channels: channels of the input image.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for v in _VGG_SMALL_CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [
                    nn.Conv2d(channels, v, 3, padding=1, bias=False),
                    nn.BatchNorm2d(v),
                    nn.ReLU(inplace=True),
                ]
                channels = v
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(channels, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Features, global average pool, linear classifier."""
        x = torch.flatten(self.avgpool(self.features(x)), 1)
        return self.classifier(x)


# MobileNetV2's inverted residual stages (expansion t, channels c, repeats n, stride s), torchvision's
# but for the second and sixth strides (2 there): with the stem's stride 2 the net downsamples 8x.
_MOBILENET_V2_CIFAR_SETTING = (
    (1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 1), (6, 320, 1, 1),
)


def mobilenet_v2_cifar(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """MobileNetV2 for 28x28 and 32x32 inputs: torchvision's blocks at width 0.5, downsampling 8x.

    Depthwise 3x3 convs between 1x1 expansions and projections, 12.4M MACs and 0.70M parameters at
    28x28 with one input channel (torchvision's ``mobilenet_v2`` there: 5.6M MACs, ending on a 1x1
    map). Module names are torchvision's (``features.N.conv.M``, ``classifier.1``).

    Args:
        num_classes: outputs of the final linear layer.
        in_channels: channels of the input image.
    """
    model = torchvision.models.MobileNetV2(
        num_classes=num_classes, width_mult=0.5,
        inverted_residual_setting=[list(stage) for stage in _MOBILENET_V2_CIFAR_SETTING])
    if in_channels != 3:
        _replace_first_conv(model, in_channels, "mobilenet_v2_cifar")
    return model


CIFAR_MODELS: dict[str, Callable[[int, int], nn.Module]] = {
    "resnet20": lambda num_classes, in_channels: CifarResNet(20, num_classes, in_channels),
    "resnet32": lambda num_classes, in_channels: CifarResNet(32, num_classes, in_channels),
    "resnet56": lambda num_classes, in_channels: CifarResNet(56, num_classes, in_channels),
    "vgg_small": lambda num_classes, in_channels: VGGSmall(num_classes, in_channels),
    "mobilenet_v2_cifar": mobilenet_v2_cifar,
}


def _torchvision_names() -> list[str]:
    """Names of torchvision's image classification models."""
    return list(torchvision.models.list_models(module=torchvision.models))


def list_models() -> list[str]:
    """Return every name :func:`get_model` accepts, sorted: the CIFAR models and torchvision's."""
    return sorted(set(CIFAR_MODELS) | set(_torchvision_names()))


def _check_count(value: object, name: str) -> int:
    """Return ``value`` as an int, or raise ValueError unless it is an integer >= 1."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"get_model: {name} must be an integer >= 1, got {value!r}")
    return value


def _parent_name(target: str) -> tuple[str, str]:
    """Split a qualified module name into its parent's name and the last component."""
    *parent, name = target.rsplit(".", 1)
    return (parent[0] if parent else ""), name


def _replace_first_conv(model: nn.Module, in_channels: int, model_name: str) -> None:
    """Rebuild the first nn.Conv2d (in module order) with ``in_channels`` inputs, in place."""
    for qualname, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            break
    else:
        raise ValueError(
            f"get_model({model_name!r}, in_channels={in_channels}): the model has no nn.Conv2d "
            f"whose input channels could be changed; use in_channels=3"
        )
    if in_channels % module.groups != 0:
        raise ValueError(
            f"get_model({model_name!r}, in_channels={in_channels}): the first conv "
            f"{qualname!r} has groups={module.groups}, which does not divide in_channels="
            f"{in_channels}; use a multiple of {module.groups}"
        )
    new = nn.Conv2d(
        in_channels,
        module.out_channels,
        module.kernel_size,
        stride=module.stride,
        padding=module.padding,
        dilation=module.dilation,
        groups=module.groups,
        bias=module.bias is not None,
        padding_mode=module.padding_mode,
        device=module.weight.device,
        dtype=module.weight.dtype,
    )
    parent, attr = _parent_name(qualname)
    setattr(model.get_submodule(parent), attr, new)


def _format_keys(keys: list[str], limit: int = 5) -> str:
    """The first ``limit`` keys and how many more there are."""
    shown = ", ".join(repr(k) for k in keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def _load_checkpoint(model: nn.Module, path: Union[str, os.PathLike]) -> None:
    """Load a state_dict file into ``model`` strictly, with errors that name the file and keys."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"get_model: checkpoint must be a path (str or os.PathLike) or None, got "
                        f"{type(path).__name__} {path!r}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"checkpoint file {str(path)!r} does not exist or is not a file; pass the path of a "
            f"file written by torch.save(model.state_dict(), path)"
        )
    from fxtucker.io import load_error

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle and zip errors have many types; all mean "not loadable"
        raise ValueError(
            f"could not load checkpoint {str(path)!r} with torch.load(weights_only=True): {load_error(e)}; "
            f"save a plain state_dict with torch.save(model.state_dict(), path)"
        ) from e
    state = obj
    if isinstance(obj, Mapping):
        for key in ("model", "state_dict"):
            if isinstance(obj.get(key), Mapping):
                state = obj[key]
                break
    if not isinstance(state, Mapping) or not all(
        isinstance(v, torch.Tensor) for v in state.values()
    ):
        raise ValueError(
            f"checkpoint {str(path)!r} holds a {type(obj).__name__} that is not a state_dict "
            f"(a mapping of names to tensors), nor a dict with one under 'model' or 'state_dict'"
        )
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        hint = ""
        if unexpected and all(k.startswith("module.") for k in state):
            hint = (
                "; every key starts with 'module.' (saved from DataParallel or DDP): save "
                "model.module.state_dict() instead, or strip the prefix"
            )
        raise ValueError(
            f"checkpoint {str(path)!r} does not match the model: "
            f"{len(missing)} missing keys [{_format_keys(missing)}], "
            f"{len(unexpected)} unexpected keys [{_format_keys(unexpected)}]; check the model "
            f"name, num_classes and in_channels{hint}"
        )
    mismatched = sorted(k for k in expected if state[k].shape != expected[k].shape)
    if mismatched:
        details = ", ".join(
            f"{k!r}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
            for k in mismatched[:5]
        )
        more = f" and {len(mismatched) - 5} more" if len(mismatched) > 5 else ""
        raise ValueError(
            f"checkpoint {str(path)!r} has {len(mismatched)} tensors whose shape differs from "
            f"the model: {details}{more}; check num_classes and in_channels"
        )
    model.load_state_dict(state, strict=True)


TIMM_PREFIX = "timm:"


def _is_spec(name: str) -> bool:
    """Whether ``name`` is a ``timm:NAME``, ``module:callable`` or ``file.py:callable`` spec."""
    return ":" in name


def model_label(name: str) -> str:
    """A short name for ``name`` that is safe in a file name: ``timm-resnet10t``, ``mynet-build``."""
    if not _is_spec(name):
        return name
    if name.startswith(TIMM_PREFIX):
        return "timm-" + name[len(TIMM_PREFIX):].replace("/", "-")
    source, _, attr = name.rpartition(":")
    stem = Path(source).stem if _looks_like_file(source) else source
    return f"{stem}-{attr}".replace("/", "-").replace(os.sep, "-")


def _looks_like_file(source: str) -> bool:
    """``path/to/file.py`` rather than ``package.module``."""
    return source.endswith(".py") or "/" in source or os.sep in source


def _timm_model(name: str, spec: str, num_classes: int, in_channels: int, kwargs: dict) -> nn.Module:
    """``timm.create_model(name, pretrained=False, num_classes=, in_chans=, **kwargs)``."""
    try:
        import timm
    except ImportError as e:
        raise ImportError(
            f"--model {spec!r} needs timm, which is not installed; fxtucker builds nothing for it. "
            f"Install it with `pip install fxtucker[timm]` (or `pip install timm`)"
        ) from e
    if not timm.is_model(name):
        names = timm.list_models()
        close = difflib.get_close_matches(name, names, n=5, cutoff=0.6)
        suggestion = f" (close matches: {', '.join(repr('timm:' + c) for c in close)})" if close else ""
        raise ValueError(
            f"timm {timm.__version__} has no model {name!r}{suggestion}; timm.list_models() lists its "
            f"{len(names)} architectures (timm.list_models('resnet*') filters them)"
        )
    if kwargs.get("pretrained"):
        raise ValueError(
            f"--model {spec!r} with pretrained=true in the model kwargs: fxtucker creates timm models "
            f"without pretrained weights and downloads nothing; save the weights you want with "
            f"torch.save(model.state_dict(), path) and pass that file as the checkpoint"
        )
    kw = {"num_classes": num_classes, "in_chans": in_channels, **kwargs, "pretrained": False}
    return timm.create_model(name, **kw)


def _import_source(source: str, spec: str) -> Any:
    """The module named by a spec's part before the colon: a dotted module path or a .py file."""
    if _looks_like_file(source):
        path = Path(source).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"--model {spec!r}: the model file {source!r} does not exist or is not a file; give "
                f"path/to/file.py:callable with a path relative to {os.getcwd()!r} or an absolute one"
            )
        path = path.resolve()
        # One module per file, under a name that cannot shadow an installed package.
        mod_name = f"_fxtucker_model_{path.stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"
        if mod_name in sys.modules:
            return sys.modules[mod_name]
        loader_spec = importlib.util.spec_from_file_location(mod_name, path)
        module = importlib.util.module_from_spec(loader_spec)
        # Like `python file.py`: the file's folder comes first on sys.path for its own imports.
        if str(path.parent) not in sys.path:
            sys.path.insert(0, str(path.parent))
        sys.modules[mod_name] = module
        try:
            loader_spec.loader.exec_module(module)
        except Exception as e:
            del sys.modules[mod_name]
            raise ValueError(
                f"--model {spec!r}: running the model file {str(path)!r} raised "
                f"{type(e).__name__}: {e}; fix the file (or install what it imports)"
            ) from e
        return module
    try:
        return importlib.import_module(source)
    except ModuleNotFoundError as e:
        if e.name is not None and (source == e.name or source.startswith(e.name + ".")):
            raise ValueError(
                f"--model {spec!r}: no module named {e.name!r} can be imported; install the package "
                f"that holds {source!r}, or give a file as path/to/file.py:callable"
            ) from e
        raise ValueError(
            f"--model {spec!r}: the module {source!r} was found but importing it failed: "
            f"{type(e).__name__}: {e}; install what it imports"
        ) from e
    except Exception as e:
        raise ValueError(
            f"--model {spec!r}: importing the module {source!r} raised {type(e).__name__}: {e}; fix it"
        ) from e


def _factory_model(spec: str, num_classes: int, in_channels: int, kwargs: dict) -> nn.Module:
    """Call the user's ``module:callable`` or ``file.py:callable`` with ``kwargs``."""
    source, _, attr = spec.rpartition(":")
    if not source or not attr:
        raise ValueError(f"--model {spec!r}: give module.path:callable or path/to/file.py:callable "
                         f"(both sides of the colon), or timm:NAME")
    module = _import_source(source, spec)
    fn: Any = module
    for i, part in enumerate(attr.split(".")):
        if not hasattr(fn, part):
            owner = ".".join([source] + attr.split(".")[:i])
            names = [n for n in dir(fn) if not n.startswith("_")]
            close = difflib.get_close_matches(part, names, n=3, cutoff=0.6)
            hint = f" (close matches: {', '.join(close)})" if close else ""
            raise ValueError(f"--model {spec!r}: {owner!r} has no attribute {part!r}{hint}; name a function or "
                             f"class that returns an nn.Module")
        fn = getattr(fn, part)
    if not callable(fn):
        raise ValueError(f"--model {spec!r}: {attr!r} is a {type(fn).__name__}, not a callable; name a function "
                         f"or class that returns an nn.Module")
    kw = dict(kwargs)
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # some builtins have no signature: call as given
        params = {}
    # The dataset's classes and channels go to a factory that names them, unless given explicitly.
    for key, value in (("num_classes", num_classes), ("in_channels", in_channels)):
        if key in params and key not in kw:
            kw[key] = value
    if params:
        sig = inspect.signature(fn).replace(return_annotation=inspect.Signature.empty)
        try:
            sig.bind(**kw)
        except TypeError as e:
            raise ValueError(f"--model {spec!r}: {attr}{sig} cannot be called with keyword arguments {kwargs!r} "
                             f"({e}); change the model kwargs (--model-kwargs)") from None
    model = fn(**kw)
    if not isinstance(model, nn.Module):
        raise ValueError(f"--model {spec!r}: {attr}(**{kw!r}) returned a {type(model).__name__}, not an "
                         f"nn.Module; the callable must build and return the model")
    return model


def get_model(
    name: str,
    num_classes: int = 10,
    in_channels: int = 3,
    checkpoint: Optional[Union[str, os.PathLike]] = None,
    model_kwargs: Optional[Mapping[str, Any]] = None,
) -> nn.Module:
    """Build a model by name or spec, randomly initialized or loaded from a state_dict file.

    Names are matched case-insensitively. Torchvision models are built with ``weights=None``
    (nothing is downloaded); for ``in_channels != 3`` their first ``nn.Conv2d`` in module order
    is rebuilt with the new input channels and every other attribute kept, and PyTorch's
    default initialization.

    Args:
        name: ``"resnet20"``, ``"resnet32"``, ``"resnet56"``, ``"vgg_small"``,
            ``"mobilenet_v2_cifar"``, any name in
            ``torchvision.models.list_models(module=torchvision.models)`` (see :func:`list_models`),
            or a spec: ``"timm:NAME"`` (``timm.create_model(NAME, pretrained=False,
            num_classes=, in_chans=)``; needs ``pip install fxtucker[timm]``),
            ``"package.module:callable"`` or ``"path/to/file.py:callable"`` (called with
            ``model_kwargs``, plus ``num_classes`` and ``in_channels`` when it has parameters of
            those names that ``model_kwargs`` does not set).
        num_classes: outputs of the classifier.
        in_channels: channels of the input image (1 for Fashion-MNIST).
        checkpoint: optional path of a file saved with ``torch.save``: a bare state_dict, or a
            dict holding one under ``"model"`` or ``"state_dict"``. Loaded strictly on the CPU
            with ``weights_only=True``.
        model_kwargs: keyword arguments for the model's constructor (torchvision, timm or the
            user's callable); the CIFAR models take none.

    Returns:
        The model, in training mode, on the CPU.

    Raises:
        ValueError: unknown name (with close matches), a spec whose module, attribute or timm
            name does not exist or whose callable does not return an nn.Module, bad counts, or
            a checkpoint whose keys or shapes do not match.
        FileNotFoundError: ``checkpoint`` or a spec's model file does not exist.
        ImportError: a ``timm:`` spec without timm installed.

    Example:
        >>> model = get_model("resnet20", num_classes=10, in_channels=1)
        >>> model(torch.randn(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """
    if not isinstance(name, str):
        raise ValueError(f"get_model: name must be a str, got {type(name).__name__}; "
                         f"list_models() lists the valid names")
    num_classes = _check_count(num_classes, "num_classes")
    in_channels = _check_count(in_channels, "in_channels")
    if model_kwargs is not None and not isinstance(model_kwargs, Mapping):
        raise ValueError(f"get_model: model_kwargs must be a mapping of keyword arguments or None, got "
                         f"{type(model_kwargs).__name__} {model_kwargs!r}")
    kwargs = dict(model_kwargs or {})
    key = name.lower()
    if name.startswith(TIMM_PREFIX):
        model = _timm_model(name[len(TIMM_PREFIX):], name, num_classes, in_channels, kwargs)
    elif _is_spec(name):
        model = _factory_model(name, num_classes, in_channels, kwargs)
    elif key in CIFAR_MODELS:
        if kwargs:
            raise ValueError(f"get_model({name!r}): the CIFAR models take no model_kwargs, got {kwargs!r}; "
                             f"drop them (num_classes and in_channels are their only settings)")
        model = CIFAR_MODELS[key](num_classes, in_channels)
    elif key in _torchvision_names():
        for field in ("weights", "weights_backbone"):
            if kwargs.get(field) is not None:
                raise ValueError(f"get_model({name!r}) with {field}={kwargs[field]!r} in the model kwargs: fxtucker builds "
                                 f"torchvision models without downloading weights; to start from trained weights, "
                                 f"save them with torch.save(model.state_dict(), path) and pass the file as the checkpoint")
        # As for the factories: num_classes in the model kwargs overrides the dataset's.
        from fxtucker.io import is_int

        kw = {"num_classes": num_classes, **kwargs, "weights": None}
        if not is_int(kw["num_classes"]) or kw["num_classes"] < 1:
            raise ValueError(f"get_model({name!r}): num_classes in the model kwargs must be an integer >= 1, "
                             f"got {kw['num_classes']!r}")
        try:
            model = torchvision.models.get_model(key, **kw)
        except TypeError as e:
            what = ("does not take" if "unexpected keyword argument" in str(e) else "refused")
            raise ValueError(f"get_model({name!r}): torchvision's {key} {what} the model kwargs {kwargs!r} ({e}); "
                             f"valid: the keyword parameters of torchvision.models.{key}, with values of their "
                             f"types") from None
        if in_channels != 3:
            _replace_first_conv(model, in_channels, key)
    else:
        close = difflib.get_close_matches(key, list_models(), n=5, cutoff=0.6)
        suggestion = f" (close matches: {', '.join(repr(c) for c in close)})" if close else ""
        raise ValueError(
            f"unknown model {name!r}{suggestion}; list_models() lists all "
            f"{len(list_models())} valid names, and timm:NAME, module.path:callable or "
            f"path/to/file.py:callable name others"
        )
    if checkpoint is not None:
        _load_checkpoint(model, checkpoint)
    return model
