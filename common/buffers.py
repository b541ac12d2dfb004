"""A model's buffers on the wire: BatchNorm's running statistics and the like.

Buffers are a module's persistent state that is not a parameter (``running_mean``,
``running_var``, ``num_batches_tracked``). In shared mode (the default) each upload
carries the node's buffers after its computation and each broadcast the aggregated ones,
both as one byte string: every buffer's raw little-endian bytes in its dtype, end to end,
in ``state_dict`` order (``UploadHeader.buffers``, ``ParameterHeader.buffers``). They
are small next to the parameters and travel whole in one message (at most
``MAX_BUFFER_BYTES``). ``--buffers local`` (FedBN, Li et al. 2021) keeps them on the nodes.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from fedgrad.codec import TensorSpec, specs_of
from fedgrad.errors import InvalidArgument

__all__ = ["MAX_BUFFER_BYTES", "buffer_specs", "load_buffers", "model_buffers", "pack", "unpack"]

#: The most buffer bytes one header carries (the message limit is 4 MiB).
MAX_BUFFER_BYTES = 2 << 20
_NUMPY = {
    torch.float32: np.float32,
    torch.float16: np.float16,
    torch.float64: np.float64,
    torch.int64: np.int64,
}


def model_buffers(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Return the persistent buffers of ``model`` by name, in ``state_dict`` order."""
    state = model.state_dict(keep_vars=True)
    params = {id(p) for p in model.parameters()}
    return [(n, t) for n, t in state.items() if id(t) not in params]


def buffer_specs(model: nn.Module) -> list[TensorSpec]:
    """Describe ``model``'s buffers as manifest entries.

    Raises:
        ValueError: a buffer of a dtype the wire cannot carry (not float or int64).
    """
    specs = specs_of(model_buffers(model))
    for s in specs:
        if s.dtype not in _NUMPY and s.dtype != torch.bfloat16:
            raise ValueError(
                f"buffer {s.name!r} is {s.dtype}; buffers must be float or int64 to be shared"
                " (run with --buffers local)"
            )
    return specs


def pack(tensors: Sequence[torch.Tensor]) -> bytes:
    """Return buffers as one byte string (each raw, in its dtype, end to end)."""
    parts = []
    for t in tensors:
        flat = t.detach().to("cpu").contiguous().reshape(-1)
        if flat.dtype == torch.bfloat16:
            flat = flat.view(torch.int16)
        parts.append(flat.numpy().tobytes())
    return b"".join(parts)


def unpack(specs: Sequence[TensorSpec], raw: bytes, where: str) -> list[np.ndarray]:
    """Return the buffers in ``raw`` as numpy arrays (bfloat16 widened to float32).

    Args:
        specs: the buffer manifest.
        raw: the bytes (``pack``'s layout).
        where: what carried them, for messages ("the upload").

    Raises:
        InvalidArgument: the length differs from the manifest's, or a float is not finite.
    """
    want = sum(s.nbytes for s in specs)
    if len(raw) != want:
        raise InvalidArgument(
            f"{where} carries {len(raw)} bytes of buffers, the buffer manifest needs {want}"
        )
    out, at = [], 0
    for s in specs:
        if s.dtype == torch.bfloat16:
            bits = np.frombuffer(raw, np.uint16, s.numel, at)
            values = (bits.astype(np.uint32) << 16).view(np.float32)
        else:
            values = np.frombuffer(raw, _NUMPY[s.dtype], s.numel, at)
        if values.dtype.kind == "f" and not np.isfinite(values).all():
            raise InvalidArgument(f"{where}'s buffer {s.name!r} holds a NaN or infinite value")
        out.append(values)
        at += s.nbytes
    return out


def load_buffers(tensors: Sequence[torch.Tensor], values: Sequence[np.ndarray]) -> None:
    """Copy ``unpack``'s arrays into the model's buffers (cast to each buffer's dtype)."""
    with torch.no_grad():
        for t, v in zip(tensors, values, strict=True):
            t.copy_(torch.from_numpy(np.array(v)).view(t.shape).to(t.dtype))
