"""fnn: a functional neural-network library for JAX.

Every layer is an ``(init, apply)`` pair of pure functions (see :mod:`fnn.core`)::

    model = fnn.serial(fnn.Dense(512), fnn.Relu(), fnn.Dense(10))
    params, state = model.init(jax.random.key(0), x)
    logits, state = model.apply(params, state, x)

The library never imports the application above it (:mod:`fnn.app`: the command line, configs,
host settings and plots).
"""

from fnn.adapters import lora as lora
from fnn.adapters import lora_adapters as lora_adapters
from fnn.adapters import lora_frozen as lora_frozen
from fnn.adapters import merge_lora as merge_lora
from fnn.combinators import branch as branch
from fnn.combinators import named as named
from fnn.combinators import remat as remat
from fnn.combinators import repeat as repeat
from fnn.combinators import residual as residual
from fnn.combinators import serial as serial
from fnn.core import Children as Children
from fnn.core import Layer as Layer
from fnn.core import LayerError as LayerError
from fnn.core import MissingKeyError as MissingKeyError
from fnn.core import ParamError as ParamError
from fnn.core import Seq as Seq
from fnn.core import ShapeError as ShapeError
from fnn.core import UnboundAxisError as UnboundAxisError
from fnn.inspection import capture_intermediates as capture_intermediates
from fnn.inspection import check_params as check_params
from fnn.inspection import flops as flops
from fnn.inspection import param_bytes as param_bytes
from fnn.inspection import param_count as param_count
from fnn.inspection import record_layers as record_layers
from fnn.inspection import summary as summary
from fnn.precision import Policy as Policy
from fnn.precision import with_policy as with_policy
from fnn.layers import *  # noqa: F401,F403 - the layer factories are public (fnn.layers.__all__)

from fnn import data as data  # noqa: E402 - submodules after the names they use
from fnn import diffusion as diffusion  # noqa: E402
from fnn import interop as interop  # noqa: E402
from fnn import losses as losses  # noqa: E402
from fnn import models as models  # noqa: E402
from fnn import quality as quality  # noqa: E402
from fnn import train as train  # noqa: E402

__version__ = "0.1.0"
