"""An independent PyTorch DenseNet, keyed like torchvision's state dicts.

It is the reference that dnl_zoo's weight conversion is tested against and the
PyTorch side of the speed benchmarks. It is written from the DenseNet paper, not
taken from torchvision (whose CIFAR-size networks do not exist), and names its
modules as torchvision does (`features.denseblock1.denselayer1.conv1`) so that
its state dicts read like torchvision's.
"""

import torch
from torch import nn


class DenseLayer(nn.Module):
    """BN-ReLU-Conv1x1 to 4k, BN-ReLU-Conv3x3 to k, on the concatenated history."""

    def __init__(self, in_channels: int, growth_rate: int, width: int = 4):
        super().__init__()
        self.norm1 = nn.BatchNorm2d(in_channels)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(in_channels, width * growth_rate, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(width * growth_rate)
        self.relu2 = nn.ReLU()
        self.conv2 = nn.Conv2d(
            width * growth_rate, growth_rate, 3, padding=1, bias=False
        )

    def forward(self, history: torch.Tensor) -> torch.Tensor:
        """Maps (batch, C, H, W) to (batch, C + k, H, W)."""
        y = self.conv1(self.relu1(self.norm1(history)))
        y = self.conv2(self.relu2(self.norm2(y)))
        return torch.cat([history, y], dim=1)


class Transition(nn.Sequential):
    """BN-ReLU-Conv1x1, then 2x2 average pooling."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm = nn.BatchNorm2d(in_channels)
        self.relu = nn.ReLU()
        self.conv = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.pool = nn.AvgPool2d(2, stride=2)


class DenseNet(nn.Module):
    """DenseNet-BC with an 'imagenet' (7x7/2, BN, ReLU, max pool) or 'cifar' stem."""

    def __init__(
        self,
        block_config: tuple[int, ...],
        growth_rate: int,
        num_init_features: int,
        *,
        stem: str = "imagenet",
        in_channels: int = 3,
        num_classes: int = 1000,
        compression: float = 0.5,
    ):
        super().__init__()
        self.features = nn.Sequential()
        if stem == "imagenet":
            self.features.add_module(
                "conv0",
                nn.Conv2d(in_channels, num_init_features, 7, 2, 3, bias=False),
            )
            self.features.add_module("norm0", nn.BatchNorm2d(num_init_features))
            self.features.add_module("relu0", nn.ReLU())
            self.features.add_module("pool0", nn.MaxPool2d(3, 2, padding=1))
        else:
            self.features.add_module(
                "conv0",
                nn.Conv2d(in_channels, num_init_features, 3, padding=1, bias=False),
            )
        channels = num_init_features
        for b, num_layers in enumerate(block_config):
            block = nn.Sequential()
            for i in range(num_layers):
                block.add_module(
                    f"denselayer{i + 1}", DenseLayer(channels, growth_rate)
                )
                channels += growth_rate
            self.features.add_module(f"denseblock{b + 1}", block)
            if b < len(block_config) - 1:
                out = int(compression * channels)
                self.features.add_module(
                    f"transition{b + 1}", Transition(channels, out)
                )
                channels = out
        self.features.add_module(
            f"norm{len(block_config) + 1}", nn.BatchNorm2d(channels)
        )
        self.classifier = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Maps images (batch, C, H, W) to logits (batch, num_classes)."""
        y = torch.relu(self.features(x))
        return self.classifier(y.mean(dim=(2, 3)))


def randomise_batch_norm(model: nn.Module, generator: torch.Generator) -> None:
    """Gives every BatchNorm random affine weights and running statistics.

    Fresh BatchNorms are the identity in eval mode, which would hide a mapping
    that swaps or drops them.
    """
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                c = module.num_features
                module.weight.copy_(1 + 0.2 * torch.randn(c, generator=generator))
                module.bias.copy_(0.2 * torch.randn(c, generator=generator))
                module.running_mean.copy_(0.2 * torch.randn(c, generator=generator))
                module.running_var.copy_(0.5 + torch.rand(c, generator=generator))
