"""Models built from fnn's layers."""

from fnn.models.cnn import LeNet as LeNet
from fnn.models.mlp import MLP as MLP
from fnn.models.resnet import BasicBlock as BasicBlock
from fnn.models.resnet import Bottleneck as Bottleneck
from fnn.models.resnet import ResNet as ResNet

__all__ = ["MLP", "LeNet", "ResNet", "BasicBlock", "Bottleneck"]
