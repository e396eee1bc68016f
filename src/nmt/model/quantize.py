"""int8 decoding on CPU: dynamic quantization of the model's matrix products.

`quantize_int8` returns a copy of a trained `Seq2Seq` in which every `nn.Linear`, `nn.GRU` and
`nn.LSTM` is torch's dynamically quantized module: int8 weights (per tensor), activations
quantized on the fly per call, fbgemm (x86) or qnnpack (ARM) kernels. Embeddings stay fp32; a
tied output projection gets its own int8 copy of the embedding matrix.

Why: on a CPU the decoder step is bound by its matrix products (batched beam search) or by
reading its weights (one sentence at a time); int8 cuts both. It is an approximation: outputs
can differ from fp32 where two hypotheses are close (measured numbers in reports/bench). It is
for decoding only: training, evaluation metrics, the parity-checked portable export and the
registered model stay fp32, and it runs on CPU only.

torch marks `torch.ao.quantization` as deprecated in favour of torchao; with the pinned torch
it works, and its deprecation warnings are silenced here.
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import nn

from nmt.model.seq2seq import Seq2Seq

QUANTIZED_MODULES = (nn.Linear, nn.GRU, nn.LSTM)


def quantize_int8(model: Seq2Seq) -> Seq2Seq:
    """An int8 copy of `model` for CPU decoding (eval mode); `model` itself is not changed.

    Raises:
        ValueError: the model is not on the CPU, or this torch build has no int8 CPU engine.
    """
    devices = {p.device.type for p in model.parameters()}
    if devices != {"cpu"}:
        raise ValueError(f"int8 decoding runs on the CPU only, but the model is on "
                         f"{', '.join(sorted(devices))}: load it with device='cpu'")
    engines = torch.backends.quantized.supported_engines
    if not any(e in engines for e in ("fbgemm", "x86", "qnnpack")):
        raise ValueError(f"this torch build has no int8 CPU engine (supported: {engines}); "
                         "decode in fp32 instead")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        warnings.filterwarnings("ignore", message=".*quantiz.*")
        quantized = torch.ao.quantization.quantize_dynamic(
            copy.deepcopy(model).eval(), set(QUANTIZED_MODULES), dtype=torch.qint8)
    return quantized.eval()


def is_quantized(model: nn.Module) -> bool:
    """True when `model` holds dynamically quantized modules (from `quantize_int8`)."""
    return any(type(m).__module__.startswith("torch.ao.nn.quantized") for m in model.modules())
