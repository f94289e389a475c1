"""Weights in and out of fnn: weight files (safetensors, npz), PyTorch and Hugging Face layouts,
and deployment with ``jax.export``.

- :mod:`fnn.interop.weights`: ``save_safetensors``/``load_safetensors`` and ``save_npz``/
  ``load_npz`` for any params/state tree, keys joined by ``/``, checked against the model on
  load.
- :mod:`fnn.interop.pytorch`: a PyTorch ``state_dict`` (torch tensors or numpy arrays; torch itself
  is not needed) to fnn params and state and back, by layout rules written once per layer family,
  and whole models: torchvision's ResNets and Hugging Face's GPT-2.
- :mod:`fnn.interop.export`: a model's forward pass as a ``jax.export`` file that runs with JAX
  alone; weights embedded, or an argument read from a safetensors file.
"""

from fnn.interop.export import ExportError as ExportError
from fnn.interop.export import ExportedFunction as ExportedFunction
from fnn.interop.export import export_model as export_model
from fnn.interop.export import exported_weights as exported_weights
from fnn.interop.export import load_exported as load_exported
from fnn.interop.export import save_exported as save_exported

from fnn.interop.weights import WeightsError as WeightsError
from fnn.interop.weights import flatten as flatten
from fnn.interop.weights import load_npz as load_npz
from fnn.interop.weights import load_safetensors as load_safetensors
from fnn.interop.weights import read_npz as read_npz
from fnn.interop.weights import read_safetensors as read_safetensors
from fnn.interop.weights import read_safetensors_metadata as read_safetensors_metadata
from fnn.interop.weights import save_npz as save_npz
from fnn.interop.weights import save_safetensors as save_safetensors
from fnn.interop.weights import unflatten as unflatten
