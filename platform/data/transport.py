"""Packs cross from a DataLoader worker to the trainer as one flat byte tensor.

torch's worker queue moves every tensor of a batch through its own
shared-memory segment (create, map, send the descriptor, map again on the
other side). A `PackedSequence` contains a dozen index tensors plus one tensor per
VAE image, and that per-tensor cost (about 5 ms for a 400-token pack on one
core) was larger than building the pack. Copying every tensor into one
buffer costs one segment per pack; the trainer gets views into that buffer.
The round trip is byte-exact.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from bagel.model.inputs import PackedSequence

# Byte alignment of each tensor in the buffer: a multiple of every element
# size, so that a slice can be viewed as its dtype.
_ALIGN = 64


@dataclass
class TensorSpec:
    """Location of one tensor in the buffer; `index` is its position in a list field, or -1."""

    field: str
    index: int
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # bytes from the start of the buffer
    nbytes: int


@dataclass
class FlatPack:
    """A `PackedSequence` as one uint8 buffer plus its non-tensor fields."""

    buffer: torch.Tensor  # uint8 [total bytes]
    specs: list[TensorSpec]
    others: dict  # the fields that are not tensors (lists of ints and strings, dicts)


def _tensors(packed: PackedSequence) -> list[tuple[str, int, torch.Tensor]]:
    found = []
    for f in fields(packed):
        value = getattr(packed, f.name)
        if isinstance(value, torch.Tensor):
            found.append((f.name, -1, value))
        elif isinstance(value, list) and value and all(isinstance(v, torch.Tensor) for v in value):
            found += [(f.name, i, v) for i, v in enumerate(value)]
    return found


def flatten_pack(packed: PackedSequence) -> FlatPack:
    """Copy every tensor of `packed` (CPU) into one buffer."""
    tensors = _tensors(packed)
    specs, offset = [], 0
    for name, index, tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        specs.append(TensorSpec(name, index, tensor.dtype, tuple(tensor.shape), offset, nbytes))
        offset += -(-nbytes // _ALIGN) * _ALIGN

    buffer = torch.empty(offset, dtype=torch.uint8)
    for spec, (_, _, tensor) in zip(specs, tensors):
        buffer[spec.offset : spec.offset + spec.nbytes] = tensor.contiguous().reshape(-1).view(torch.uint8)

    tensor_fields = {name for name, _, _ in tensors}
    others = {f.name: getattr(packed, f.name) for f in fields(packed) if f.name not in tensor_fields}
    return FlatPack(buffer, specs, others)


def unflatten_pack(flat: FlatPack) -> PackedSequence:
    """Rebuild the `PackedSequence`; its tensors are views into `flat.buffer`."""
    values = dict(flat.others)
    for spec in flat.specs:
        tensor = flat.buffer[spec.offset : spec.offset + spec.nbytes].view(spec.dtype).view(spec.shape)
        if spec.index < 0:
            values[spec.field] = tensor
        else:
            values.setdefault(spec.field, []).append(tensor)
    return PackedSequence(**values)
