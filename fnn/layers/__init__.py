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
from fnn.layers.activations import Relu as Relu
from fnn.layers.activations import Relu6 as Relu6
from fnn.layers.activations import Selu as Selu
from fnn.layers.activations import Sigmoid as Sigmoid
from fnn.layers.activations import Silu as Silu
from fnn.layers.activations import Softmax as Softmax
from fnn.layers.activations import Softplus as Softplus
from fnn.layers.activations import Tanh as Tanh
from fnn.layers.activations import activation as activation
from fnn.layers.attention import AttentionInput as AttentionInput
from fnn.layers.attention import MultiHeadAttention as MultiHeadAttention
from fnn.layers.attention import apply_rope as apply_rope
from fnn.layers.attention import attention_weights as attention_weights
from fnn.layers.attention import init_cache as init_cache
from fnn.layers.conv import Conv as Conv
from fnn.layers.conv import ConvTranspose as ConvTranspose
from fnn.layers.dense import Dense as Dense
from fnn.layers.dropout import Dropout as Dropout
from fnn.layers.embedding import Embedding as Embedding
from fnn.layers.embedding import attend as attend
from fnn.layers.embedding import tied as tied
from fnn.layers.norm import BatchNorm as BatchNorm
from fnn.layers.norm import GroupNorm as GroupNorm
from fnn.layers.norm import LayerNorm as LayerNorm
from fnn.layers.norm import RMSNorm as RMSNorm
from fnn.layers.pooling import AvgPool as AvgPool
from fnn.layers.pooling import GlobalAvgPool as GlobalAvgPool
from fnn.layers.pooling import GlobalMaxPool as GlobalMaxPool
from fnn.layers.pooling import MaxPool as MaxPool
from fnn.layers.recurrent import GRU as GRU
from fnn.layers.recurrent import LSTM as LSTM
from fnn.layers.recurrent import RNN as RNN
from fnn.layers.recurrent import Bidirectional as Bidirectional
from fnn.layers.recurrent import SimpleRNN as SimpleRNN
from fnn.layers.reshape import Flatten as Flatten
from fnn.layers.transformer import DecoderBlock as DecoderBlock
from fnn.layers.transformer import DecoderInput as DecoderInput
from fnn.layers.transformer import EncoderBlock as EncoderBlock
from fnn.layers.transformer import FeedForward as FeedForward
from fnn.layers.transformer import LearnedPositionEmbedding as LearnedPositionEmbedding
from fnn.layers.transformer import SinusoidalPositionEmbedding as SinusoidalPositionEmbedding
from fnn.layers.transformer import init_block_cache as init_block_cache
from fnn.layers.transformer import sinusoidal_table as sinusoidal_table
from fnn.layers.reshape import Reshape as Reshape

__all__ = [
    "ACTIVATIONS",
    "Celu",
    "Elu",
    "Gelu",
    "HardTanh",
    "Identity",
    "Lambda",
    "LeakyRelu",
    "LogSoftmax",
    "Mish",
    "Relu",
    "Relu6",
    "Selu",
    "Sigmoid",
    "Silu",
    "Softmax",
    "Softplus",
    "Tanh",
    "activation",
    "AttentionInput",
    "MultiHeadAttention",
    "apply_rope",
    "attention_weights",
    "init_cache",
    "Conv",
    "ConvTranspose",
    "Dense",
    "Dropout",
    "Embedding",
    "attend",
    "tied",
    "BatchNorm",
    "GroupNorm",
    "LayerNorm",
    "RMSNorm",
    "AvgPool",
    "GlobalAvgPool",
    "GlobalMaxPool",
    "MaxPool",
    "GRU",
    "LSTM",
    "RNN",
    "Bidirectional",
    "SimpleRNN",
    "Flatten",
    "DecoderBlock",
    "DecoderInput",
    "EncoderBlock",
    "FeedForward",
    "LearnedPositionEmbedding",
    "SinusoidalPositionEmbedding",
    "init_block_cache",
    "sinusoidal_table",
    "Reshape",
]
