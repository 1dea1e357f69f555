"""Dense bit packing of 2- to 8-bit unsigned integer codes into bytes.

Eight b-bit values fill exactly b bytes, little-endian: value i occupies bits [i*b, (i+1)*b) of
the 64-bit word formed by those bytes. 4-bit packing is thus the usual two nibbles per byte
(low nibble first), 8-bit is the identity, and 3-bit uses 3 bytes for every 8 values.
"""
import torch

from .scheme import MAX_BITS, MIN_BITS


def _check_bits(bits: int) -> None:
    if not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"can pack {MIN_BITS} to {MAX_BITS} bits, got {bits}")


def packed_nbytes(numel: int, bits: int) -> int:
    return numel if bits == 8 else -(-numel // 8) * bits


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes in [0, 2**bits) of any shape -> flat uint8 tensor of packed_nbytes bytes."""
    _check_bits(bits)
    flat = codes.reshape(-1).to(torch.int64)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= 2**bits):
        raise ValueError(f"codes must lie in [0, {2**bits - 1}] to pack into {bits} bits")
    if bits == 8:
        return flat.to(torch.uint8)
    flat = torch.nn.functional.pad(flat, (0, -flat.numel() % 8)).reshape(-1, 8)
    shifts = torch.arange(8, dtype=torch.int64, device=flat.device) * bits
    words = (flat << shifts).sum(1, keepdim=True)  # the fields do not overlap: sum == bitwise or
    byte_shifts = torch.arange(bits, dtype=torch.int64, device=flat.device) * 8
    return ((words >> byte_shifts) & 0xFF).to(torch.uint8).reshape(-1)


def unpack(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of pack: the first `numel` codes, as a flat uint8 tensor."""
    _check_bits(bits)
    if packed.numel() != packed_nbytes(numel, bits):
        raise ValueError(f"{packed.numel()} packed bytes do not hold {numel} {bits}-bit values")
    if bits == 8:
        return packed.reshape(-1).clone()
    b = packed.reshape(-1, bits).to(torch.int64)
    words = (b << (torch.arange(bits, dtype=torch.int64, device=b.device) * 8)).sum(1, keepdim=True)
    codes = (words >> (torch.arange(8, dtype=torch.int64, device=b.device) * bits)) & (2**bits - 1)
    return codes.reshape(-1)[:numel].to(torch.uint8)
