"""IResNet-18/34/50/100, state_dict-compatible with insightface's arcface_torch.

Source of truth: ``deepinsight/insightface: recognition/arcface_torch/backbones/iresnet.py``. Module names,
layer counts, channel widths, BatchNorm eps (1e-5) and initialisation follow that file so an arcface_torch
``backbone.pth`` loads with ``strict=True``. The network is ArcFace's improved-residual ResNet (Deng et al.
2019, arXiv:1801.07698; unit BN-Conv-BN-PReLU-Conv-BN) with a stride-1 3x3 stem for 112x112 input and the "E"
output head (BN -> dropout -> FC -> BN; ``fc_type == "E"`` in insightface's MXNet
``recognition/symbol/symbol_utils.py``), whose last BN has its weight fixed to 1. arcface_torch's ``fp16``
autocast switch and gradient checkpointing are left out: they change no parameter.

The input is an RGB face aligned to 112x112 and normalised to [-1, 1]; the output is the raw embedding.
"""

from __future__ import annotations

import os
import re
from collections import OrderedDict
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from facedistill.models.registry import BACKBONES

__all__ = [
    "IRESNET_LAYERS",
    "CheckpointMismatchError",
    "IBasicBlock",
    "IResNet",
    "describe_checkpoint_architecture",
    "iresnet18",
    "iresnet34",
    "iresnet50",
    "iresnet100",
    "load_arcface_torch_checkpoint",
    "load_strictly",
    "strip_module_prefix",
]

# Blocks per stage, as in the iresnetNN functions of arcface_torch's iresnet.py.
IRESNET_LAYERS: dict[str, tuple[int, int, int, int]] = {
    "iresnet18": (2, 2, 2, 2),
    "iresnet34": (3, 4, 6, 3),
    "iresnet50": (3, 4, 14, 3),
    "iresnet100": (3, 13, 30, 3),
}

_BN_EPS = 1e-5


def _conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def _conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class IBasicBlock(nn.Module):
    """IR unit: BN -> conv3x3 -> BN -> PReLU -> conv3x3(stride) -> BN, plus the (projected) identity.

    The stride sits on the second conv, and there is no activation after the addition (ArcFace Sec. 3.2).
    """

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes, eps=_BN_EPS)
        self.conv1 = _conv3x3(inplanes, planes)
        self.bn2 = nn.BatchNorm2d(planes, eps=_BN_EPS)
        self.prelu = nn.PReLU(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn3 = nn.BatchNorm2d(planes, eps=_BN_EPS)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn1(x)
        out = self.conv1(out)
        out = self.bn2(out)
        out = self.prelu(out)
        out = self.conv2(out)
        out = self.bn3(out)
        identity = self.downsample(x) if self.downsample is not None else x
        return out + identity


class IResNet(nn.Module):
    """IResNet backbone; ``forward`` maps [B, 3, 112, 112] to a raw [B, embedding_size] embedding.

    Only 112x112 input works: ``fc`` flattens the 512x7x7 map left by four stride-2 stages.
    """

    fc_scale = 7 * 7

    def __init__(
        self,
        layers: Sequence[int],
        embedding_size: int = 512,
        dropout: float = 0.0,
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        if len(layers) != 4 or min(layers) < 1:
            raise ValueError(f"layers must be four positive block counts, got {tuple(layers)}")
        if embedding_size < 1:
            raise ValueError(f"embedding_size must be positive, got {embedding_size}")
        self.embedding_size = embedding_size
        self.layer_counts = tuple(layers)
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, self.inplanes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(self.inplanes, eps=_BN_EPS)
        self.prelu = nn.PReLU(self.inplanes)
        self.layer1 = self._make_layer(64, layers[0], stride=2)
        self.layer2 = self._make_layer(128, layers[1], stride=2)
        self.layer3 = self._make_layer(256, layers[2], stride=2)
        self.layer4 = self._make_layer(512, layers[3], stride=2)
        self.bn2 = nn.BatchNorm2d(512 * IBasicBlock.expansion, eps=_BN_EPS)
        self.dropout = nn.Dropout(p=dropout)
        self.fc = nn.Linear(512 * IBasicBlock.expansion * self.fc_scale, embedding_size)
        self.features = nn.BatchNorm1d(embedding_size, eps=_BN_EPS)
        # arcface_torch freezes this gamma at 1 (the "fix_gamma" of the MXNet "E" head); kept so checkpoints
        # and optimiser parameter groups behave the same.
        nn.init.constant_(self.features.weight, 1.0)
        self.features.weight.requires_grad = False

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0, 0.1)
            elif isinstance(m, nn.BatchNorm2d | nn.GroupNorm):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
        if zero_init_residual:
            # Same tensor arcface_torch zeroes (bn2, before the PReLU), not bn3 as torchvision would.
            for m in self.modules():
                if isinstance(m, IBasicBlock):
                    nn.init.constant_(m.bn2.weight, 0)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * IBasicBlock.expansion:
            downsample = nn.Sequential(
                _conv1x1(self.inplanes, planes * IBasicBlock.expansion, stride),
                nn.BatchNorm2d(planes * IBasicBlock.expansion, eps=_BN_EPS),
            )
        layers = [IBasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * IBasicBlock.expansion
        layers.extend(IBasicBlock(self.inplanes, planes) for _ in range(1, blocks))
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        x = self.bn1(x)
        x = self.prelu(x)
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.layer4(x)
        x = self.bn2(x)
        # torch.flatten keeps NCHW element order for channels_last tensors too, which fc's weights assume.
        x = torch.flatten(x, 1)
        x = self.dropout(x)
        x = self.fc(x)
        return self.features(x)


def _iresnet(arch: str, embedding_size: int, dropout: float, zero_init_residual: bool) -> IResNet:
    return IResNet(IRESNET_LAYERS[arch], embedding_size, dropout, zero_init_residual)


@BACKBONES.register("iresnet18")
def iresnet18(embedding_size: int = 512, dropout: float = 0.0, zero_init_residual: bool = False) -> IResNet:
    """IResNet-18, arcface_torch ``r18``."""
    return _iresnet("iresnet18", embedding_size, dropout, zero_init_residual)


@BACKBONES.register("iresnet34")
def iresnet34(embedding_size: int = 512, dropout: float = 0.0, zero_init_residual: bool = False) -> IResNet:
    """IResNet-34, arcface_torch ``r34``."""
    return _iresnet("iresnet34", embedding_size, dropout, zero_init_residual)


@BACKBONES.register("iresnet50")
def iresnet50(embedding_size: int = 512, dropout: float = 0.0, zero_init_residual: bool = False) -> IResNet:
    """IResNet-50, arcface_torch ``r50``."""
    return _iresnet("iresnet50", embedding_size, dropout, zero_init_residual)


@BACKBONES.register("iresnet100")
def iresnet100(embedding_size: int = 512, dropout: float = 0.0, zero_init_residual: bool = False) -> IResNet:
    """IResNet-100, arcface_torch ``r100``."""
    return _iresnet("iresnet100", embedding_size, dropout, zero_init_residual)


class CheckpointMismatchError(ValueError):
    """A checkpoint's keys or shapes do not match the model it is loaded into."""


_LAYER_KEY = re.compile(r"^layer([1-4])\.(\d+)\.")
_MAX_LISTED = 12


def strip_module_prefix(state: Mapping[str, torch.Tensor]) -> OrderedDict[str, torch.Tensor]:
    # DistributedDataParallel / DataParallel wrappers save every key under "module.".
    if state and all(key.startswith("module.") for key in state):
        return OrderedDict((key[len("module.") :], value) for key, value in state.items())
    return OrderedDict(state)


def infer_backbone(state: Mapping[str, torch.Tensor]) -> tuple[str, int, dict[str, int]] | None:
    """(registered backbone, embedding size, extra ``create_model`` kwargs) that wrote ``state``, from key names
    and shapes alone (arcface_torch's ``model.pt`` says nothing else); None when no registered one fits."""
    fc = state.get("fc.weight")
    if fc is not None and any(_LAYER_KEY.match(key) for key in state):
        layers = _iresnet_layers(state)
        names = [name for name, value in IRESNET_LAYERS.items() if value == layers]
        return (names[0], int(fc.shape[0]), {}) if names else None
    gdc_linear = state.get("features.layers.2.weight")
    stem = state.get("layers.0.layers.0.weight")
    if gdc_linear is not None and stem is not None:
        scale = stem.shape[0] // 64
        if scale == 1:
            return "mobilefacenet", int(gdc_linear.shape[0]), {}
        if scale == 2:
            return "mbf", int(gdc_linear.shape[0]), {}
        return "mobilefacenet", int(gdc_linear.shape[0]), {"scale": scale}
    return None


def _iresnet_layers(state: Mapping[str, torch.Tensor]) -> tuple[int, ...]:
    counts = [0, 0, 0, 0]
    for key in state:
        match = _LAYER_KEY.match(key)
        if match:
            stage, block = int(match.group(1)), int(match.group(2))
            counts[stage - 1] = max(counts[stage - 1], block + 1)
    return tuple(counts)


def describe_checkpoint_architecture(state: Mapping[str, torch.Tensor]) -> str:
    """Best guess, from key names and shapes alone, of which registered backbone wrote ``state``."""
    inferred = infer_backbone(state)
    if inferred is not None:
        name, size, kwargs = inferred
        if kwargs:
            name = f"{name}({', '.join(f'{k}={v}' for k, v in kwargs.items())})"
        return f"{name} with embedding_size={size}"
    if state.get("fc.weight") is not None and any(_LAYER_KEY.match(key) for key in state):
        return f"an IResNet with layers {list(_iresnet_layers(state))} (no registered name)"
    return "an unrecognised architecture"


def _listing(title: str, items: Sequence[str]) -> str:
    """One line of a mismatch report: the count and the first ``_MAX_LISTED`` items."""
    more = f", ... and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else ""
    return f"  {title} ({len(items)}): {', '.join(items[:_MAX_LISTED])}{more}"


def load_arcface_torch_checkpoint(
    model: nn.Module, path: str | os.PathLike[str], map_location: str | torch.device = "cpu"
) -> nn.Module:
    """Load an arcface_torch ``backbone.pth`` into ``model`` strictly and return ``model``.

    The file is read with ``torch.load(weights_only=True)``, so it cannot run code. A bare state_dict is
    expected (what arcface_torch's ``train.py`` saves as ``backbone.pth``); the ``state_dict_backbone`` entry
    of its ``checkpoint_gpu_*.pt`` resume files is also accepted. A leading ``module.`` on every key is
    removed.

    Raises:
        CheckpointMismatchError: listing missing keys, unexpected keys and shape mismatches, with a guess of
            the architecture the checkpoint was saved from.
    """
    loaded = torch.load(path, map_location=map_location, weights_only=True)
    if isinstance(loaded, Mapping) and "state_dict_backbone" in loaded:
        loaded = loaded["state_dict_backbone"]
    if not isinstance(loaded, Mapping) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise CheckpointMismatchError(f"{os.fspath(path)} does not hold a state_dict of tensors")
    state = strip_module_prefix(loaded)
    load_strictly(model, state, os.fspath(path))
    return model


def load_strictly(model: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """``model.load_state_dict(state)``, or a ``CheckpointMismatchError`` listing the missing and unexpected keys
    and the shape mismatches, with a guess of the network ``source`` (a file name, for the message) holds."""
    expected = model.state_dict()
    # BatchNorm fills in a missing num_batches_tracked itself (checkpoints from old PyTorch lack it).
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or mismatched:
        parts = [f"checkpoint {source} does not match {type(model).__name__}:"]
        if missing:
            parts.append(_listing("missing keys", missing))
        if unexpected:
            parts.append(_listing("unexpected keys", unexpected))
        if mismatched:
            parts.append(_listing("shape mismatches", mismatched))
        guess = describe_checkpoint_architecture(state)
        parts.append(f"  the checkpoint looks like {guess}; build that model.")
        raise CheckpointMismatchError("\n".join(parts))
    model.load_state_dict(state, strict=False)
