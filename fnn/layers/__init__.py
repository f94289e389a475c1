"""Layer factories, one module per family."""

from fnn.layers.activations import ACTIVATIONS as ACTIVATIONS
from fnn.layers.activations import Celu as Celu
from fnn.layers.activations import Elu as Elu
from fnn.layers.activations import Gelu as Gelu
from fnn.layers.activations import HardTanh as HardTanh
from fnn.layers.activations import Identity as Identity
from fnn.layers.activations import Lambda as Lambda
from fnn.layers.activations import LeakyRelu as LeakyRelu
from fnn.layers.activations import LogSoftmax as LogSoftmax
from fnn.layers.activations import Mish as Mish
from fnn.layers.activations import PReLU as PReLU
from fnn.layers.activations import Relu as Relu
from fnn.layers.activations import Relu6 as Relu6
from fnn.layers.activations import Selu as Selu
from fnn.layers.activations import Sigmoid as Sigmoid
from fnn.layers.activations import Silu as Silu
from fnn.layers.activations import Softmax as Softmax
from fnn.layers.activations import Softplus as Softplus
from fnn.layers.activations import Tanh as Tanh
from fnn.layers.activations import activation as activation
from fnn.layers.attention import MultiHeadAttention as MultiHeadAttention
from fnn.layers.attention import attention_weights as attention_weights
from fnn.layers.attention import causal_mask as causal_mask
from fnn.layers.attention import combine_masks as combine_masks
from fnn.layers.attention import dot_product_attention as dot_product_attention
from fnn.layers.attention import init_cache as init_cache
from fnn.layers.attention import length_mask as length_mask
from fnn.layers.attention import window_mask as window_mask
from fnn.layers.attention import write_cache as write_cache
from fnn.layers.augment import Cutout as Cutout
from fnn.layers.augment import GaussianNoise as GaussianNoise
from fnn.layers.augment import RandomCrop as RandomCrop
from fnn.layers.augment import RandomFlip as RandomFlip
from fnn.layers.augment import RandomTranslate as RandomTranslate
from fnn.layers.augment import cutmix as cutmix
from fnn.layers.conditioning import FiLM as FiLM
from fnn.layers.conditioning import TimestepEmbedding as TimestepEmbedding
from fnn.layers.conditioning import timestep_features as timestep_features
from fnn.layers.augment import mixup as mixup
from fnn.layers.conv import Conv as Conv
from fnn.layers.conv import ConvTranspose as ConvTranspose
from fnn.layers.conv import SeparableConv as SeparableConv
from fnn.layers.dense import Dense as Dense
from fnn.layers.dropout import Dropout as Dropout
from fnn.layers.embedding import Embedding as Embedding
from fnn.layers.embedding import attend as attend
from fnn.layers.embedding import tied as tied
from fnn.layers.feedforward import FeedForward as FeedForward
from fnn.layers.norm import BatchNorm as BatchNorm
from fnn.layers.norm import GroupNorm as GroupNorm
from fnn.layers.norm import InstanceNorm as InstanceNorm
from fnn.layers.norm import LayerNorm as LayerNorm
from fnn.layers.norm import RMSNorm as RMSNorm
from fnn.layers.padding import Pad as Pad
from fnn.layers.pooling import AdaptiveAvgPool as AdaptiveAvgPool
from fnn.layers.pooling import AdaptiveMaxPool as AdaptiveMaxPool
from fnn.layers.pooling import AvgPool as AvgPool
from fnn.layers.pooling import GlobalAvgPool as GlobalAvgPool
from fnn.layers.pooling import GlobalMaxPool as GlobalMaxPool
from fnn.layers.pooling import MaxPool as MaxPool
from fnn.layers.position import LearnedPositionEmbedding as LearnedPositionEmbedding
from fnn.layers.position import SinusoidalPositionEmbedding as SinusoidalPositionEmbedding
from fnn.layers.position import alibi_bias as alibi_bias
from fnn.layers.position import alibi_slopes as alibi_slopes
from fnn.layers.position import apply_rope as apply_rope
from fnn.layers.position import sinusoidal_table as sinusoidal_table
from fnn.layers.recurrent import GRU as GRU
from fnn.layers.recurrent import LSTM as LSTM
from fnn.layers.recurrent import RNN as RNN
from fnn.layers.recurrent import Bidirectional as Bidirectional
from fnn.layers.recurrent import Cell as Cell
from fnn.layers.recurrent import GRUCell as GRUCell
from fnn.layers.recurrent import LSTMCarry as LSTMCarry
from fnn.layers.recurrent import LSTMCell as LSTMCell
from fnn.layers.recurrent import RNNCarry as RNNCarry
from fnn.layers.recurrent import SimpleRNN as SimpleRNN
from fnn.layers.recurrent import SimpleRNNCell as SimpleRNNCell
from fnn.layers.reparam import SpectralNorm as SpectralNorm
from fnn.layers.reparam import WeightNorm as WeightNorm
from fnn.layers.resample import PixelShuffle as PixelShuffle
from fnn.layers.resample import PixelUnshuffle as PixelUnshuffle
from fnn.layers.resample import Upsample as Upsample
from fnn.layers.reshape import Flatten as Flatten
from fnn.layers.reshape import Reshape as Reshape
from fnn.layers.transformer import DecoderBlock as DecoderBlock
from fnn.layers.transformer import EncoderBlock as EncoderBlock
from fnn.layers.transformer import init_block_cache as init_block_cache

__all__ = [
    # activations
    "ACTIVATIONS", "Celu", "Elu", "Gelu", "HardTanh", "Identity", "Lambda", "LeakyRelu",
    "LogSoftmax", "Mish", "PReLU", "Relu", "Relu6", "Selu", "Sigmoid", "Silu", "Softmax",
    "Softplus", "Tanh", "activation",
    # attention and its pieces
    "MultiHeadAttention", "attention_weights", "causal_mask", "combine_masks",
    "dot_product_attention", "init_cache", "length_mask", "window_mask", "write_cache",
    # data augmentation (training only) and batch mixes
    "Cutout", "GaussianNoise", "RandomCrop", "RandomFlip", "RandomTranslate", "cutmix", "mixup",
    # convolution, dense, dropout, embedding, feed-forward
    "Conv", "ConvTranspose", "SeparableConv", "Dense", "Dropout", "Embedding", "attend", "tied",
    "FeedForward",
    # normalisation and pooling
    "BatchNorm", "GroupNorm", "InstanceNorm", "LayerNorm", "RMSNorm", "AdaptiveAvgPool",
    "AdaptiveMaxPool", "AvgPool", "GlobalAvgPool", "GlobalMaxPool", "MaxPool",
    # padding and resampling of the spatial axes
    "Pad", "PixelShuffle", "PixelUnshuffle", "Upsample",
    # positional encodings
    "LearnedPositionEmbedding", "SinusoidalPositionEmbedding", "alibi_bias", "alibi_slopes",
    "apply_rope", "sinusoidal_table",
    # recurrent
    "GRU", "LSTM", "RNN", "SimpleRNN", "Bidirectional", "Cell", "GRUCell", "LSTMCell",
    "SimpleRNNCell", "LSTMCarry", "RNNCarry",
    # shape
    "Flatten", "Reshape",
    # transformer blocks
    "DecoderBlock", "EncoderBlock", "init_block_cache",
    # conditioning (diffusion timesteps, FiLM) and weight reparametrisations
    "FiLM", "TimestepEmbedding", "timestep_features", "SpectralNorm", "WeightNorm",
]
