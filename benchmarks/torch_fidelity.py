"""How closely fnn's imports of PyTorch models reproduce them: ResNet-18/50 in torchvision's
layout (tests/torch_resnet.py) and a Hugging Face GPT-2, random weights (BatchNorm statistics
randomised), the largest difference of the logits relative to their scale, in evaluation and
in training, and the time the import takes. Needs the interop extra (torch, transformers).

    python benchmarks/torch_fidelity.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

try:
    import torch
    import transformers
except ImportError as e:
    sys.exit(f"torch_fidelity: needs the interop extra (pip install -e '.[interop]'): {e}")

import jax.numpy as jnp

from fnn.interop.pytorch import import_hf_gpt2, import_torchvision_resnet

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import torch_resnet  # noqa: E402 - torchvision's modules and names, written out in torch


def scaled(ours, theirs) -> float:
    theirs = theirs.detach().numpy()
    return float(np.abs(np.asarray(ours) - theirs).max() / np.abs(theirs).max())


def resnet(arch: str) -> str:
    m = getattr(torch_resnet, arch)()
    with torch.no_grad():
        for module in m.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 1.5)
    start = time.perf_counter()
    model, params, state = import_torchvision_resnet(m.state_dict())
    seconds = time.perf_counter() - start
    x = torch.randn(4, 3, 128, 128)
    nhwc = jnp.asarray(x.permute(0, 2, 3, 1).numpy())
    m.eval()
    evaluation = scaled(model.apply(params, state, nhwc)[0], m(x))
    m.train()
    training = scaled(model.apply(params, state, nhwc, train=True)[0], m(x))
    return f"| {arch} | {seconds:.2f} s | {evaluation:.1e} | {training:.1e} |"


def gpt2() -> str:
    config = transformers.GPT2Config(vocab_size=1000, n_positions=128, n_embd=256, n_layer=4,
                                     n_head=8, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                     bos_token_id=0, eos_token_id=0)
    m = transformers.GPT2LMHeadModel(config).eval()
    start = time.perf_counter()
    model, params = import_hf_gpt2(m.state_dict(), m.config)
    seconds = time.perf_counter() - start
    ids = torch.randint(0, 1000, (2, 128))
    logits = model.apply(params, {}, jnp.asarray(ids.numpy(), jnp.int32))[0]
    return f"| GPT-2 4 layers d256 | {seconds:.2f} s | {scaled(logits, m(ids).logits):.1e} | - |"


def main() -> None:
    torch.manual_seed(0)
    print("| model | import | eval | train |\n|---|---|---|---|")
    for row in (resnet("resnet18"), resnet("resnet50"), gpt2()):
        print(row)


if __name__ == "__main__":
    main()
