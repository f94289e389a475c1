"""Models built from fnn's layers."""

from fnn.models.cnn import LeNet as LeNet
from fnn.models.gan import DCGANDiscriminator as DCGANDiscriminator
from fnn.models.gan import DCGANGenerator as DCGANGenerator
from fnn.models.lm import GPT as GPT
from fnn.models.lm import CharLSTM as CharLSTM
from fnn.models.lm import generate as generate
from fnn.models.lm import init_gpt_cache as init_gpt_cache
from fnn.models.lm import init_lstm_carry as init_lstm_carry
from fnn.models.lm import sample_logits as sample_logits
from fnn.models.mlp import MLP as MLP
from fnn.models.resnet import BasicBlock as BasicBlock
from fnn.models.resnet import Bottleneck as Bottleneck
from fnn.models.resnet import ResNet as ResNet
from fnn.models.unet import UNet as UNet
from fnn.models.vit import TransformerClassifier as TransformerClassifier
from fnn.models.vit import ViT as ViT

__all__ = ["MLP", "LeNet", "ResNet", "BasicBlock", "Bottleneck", "CharLSTM", "GPT", "generate",
           "init_gpt_cache", "init_lstm_carry", "sample_logits", "ViT", "TransformerClassifier",
           "DCGANGenerator", "DCGANDiscriminator", "UNet"]
