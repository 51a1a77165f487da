"""The line-art annotator network that ControlNet's lineart model was trained against.

`lllyasviel/Annotators` ships `sk_model.pth` ("realistic") and `sk_model2.pth` ("coarse"): the generator
from "Learning to generate line drawings that convey geometry and semantics" (informative drawings), a
CycleGAN-style ResNet generator with 3 residual blocks. Only plain state dicts are published, so the
module layout here reproduces the original attribute names and `nn.Sequential` indices exactly
(`model0.1.weight`, `model2.0.conv_block.1.weight`, ...) for `load_state_dict` to accept the files as
they are. Instance norms carry no parameters, so the files hold convolution weights only.
"""

from __future__ import annotations

import torch
from torch import nn


class ResidualBlock(nn.Module):
    """Two reflection-padded 3x3 convolutions with instance norm, added back onto the input."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv_block = nn.Sequential(
            nn.ReflectionPad2d(1),
            nn.Conv2d(channels, channels, 3),
            nn.InstanceNorm2d(channels),
            nn.ReLU(inplace=True),
            nn.ReflectionPad2d(1),
            nn.Conv2d(channels, channels, 3),
            nn.InstanceNorm2d(channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv_block(x)


class LineartGenerator(nn.Module):
    """RGB in [0, 1] → one channel in [0, 1]: 1 is blank paper, lines go towards 0 (dark lines on white).

    Two stride-2 convolutions down, residual blocks at 1/4 resolution, two transposed convolutions up:
    the output is 4·ceil(side/4) pixels, so callers feed sides that are multiples of 4 or resize after.
    """

    def __init__(self, input_nc: int = 3, output_nc: int = 1, n_residual_blocks: int = 3) -> None:
        super().__init__()
        self.model0 = nn.Sequential(
            nn.ReflectionPad2d(3), nn.Conv2d(input_nc, 64, 7), nn.InstanceNorm2d(64), nn.ReLU(inplace=True)
        )
        down: list[nn.Module] = []
        channels = 64
        for _ in range(2):
            down += [
                nn.Conv2d(channels, channels * 2, 3, stride=2, padding=1),
                nn.InstanceNorm2d(channels * 2),
                nn.ReLU(inplace=True),
            ]
            channels *= 2
        self.model1 = nn.Sequential(*down)
        self.model2 = nn.Sequential(*(ResidualBlock(channels) for _ in range(n_residual_blocks)))
        up: list[nn.Module] = []
        for _ in range(2):
            up += [
                nn.ConvTranspose2d(channels, channels // 2, 3, stride=2, padding=1, output_padding=1),
                nn.InstanceNorm2d(channels // 2),
                nn.ReLU(inplace=True),
            ]
            channels //= 2
        self.model3 = nn.Sequential(*up)
        self.model4 = nn.Sequential(nn.ReflectionPad2d(3), nn.Conv2d(64, output_nc, 7), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model4(self.model3(self.model2(self.model1(self.model0(x)))))
