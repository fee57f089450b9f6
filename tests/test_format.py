"""The packing spec: exact round trips for every width and odd shapes, and the documented bit layout."""

from __future__ import annotations

import pytest
import torch

from compress import format as fmt
from compress.plan import LayerSpec

SHAPES = [(1, 1), (3, 31), (5, 32), (7, 33), (2, 100), (4, 576), (3, 1536)]


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{n}x{k}" for n, k in SHAPES])
def test_pack_unpack_round_trip_is_exact(bits: int, shape: tuple[int, int]) -> None:
    g = torch.Generator().manual_seed(bits * 1000 + shape[1])
    codes = torch.randint(0, 2**bits, shape, generator=g, dtype=torch.uint8)
    q = fmt.pack(codes, bits)
    assert q.dtype == torch.int32
    assert q.shape == (shape[0], fmt.packed_words(shape[1], bits))
    assert torch.equal(fmt.unpack(q, bits, shape[1]), codes)


@pytest.mark.parametrize("bits", range(1, 9))
def test_extreme_codes_survive_the_sign_bit(bits: int) -> None:
    codes = torch.full((2, 64), 2**bits - 1, dtype=torch.uint8)
    codes[1, ::2] = 0
    assert torch.equal(fmt.unpack(fmt.pack(codes, bits), bits, 64), codes)


def test_thirty_two_codes_take_exactly_bits_words() -> None:
    for bits in range(1, 9):
        assert fmt.packed_words(32, bits) == bits
        assert fmt.packed_words(33, bits) == 2 * bits  # K is padded to a multiple of 32


def test_three_bit_layout_is_a_two_bit_plane_then_a_one_bit_plane() -> None:
    # codes 0..7 repeated over 32 columns: lo2 = code & 3 in word 0-1, hi1 = code >> 2 in word 2
    codes = (torch.arange(32) % 8).to(torch.uint8).unsqueeze(0)
    q = fmt.pack(codes, 3).to(torch.int64) & 0xFFFFFFFF
    lo = [(int(q[0, k // 16]) >> (2 * (k % 16))) & 3 for k in range(32)]
    hi = [(int(q[0, 2]) >> k) & 1 for k in range(32)]
    assert lo == [c & 3 for c in codes[0].tolist()]
    assert hi == [c >> 2 for c in codes[0].tolist()]


def test_four_bit_words_hold_eight_codes_lsb_first() -> None:
    codes = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8] + [0] * 24], dtype=torch.uint8)
    assert int(fmt.pack(codes, 4)[0, 0]) == 0x87654321 - 2**32


@pytest.mark.parametrize(("bits", "group", "sym", "expected"), [
    (4, 128, False, 4 + 24 / 128), (3, 128, True, 3 + 16 / 128),
    (2, 64, False, 2 + 24 / 64), (4, -1, False, 4 + 24 / 4096)])
def test_bits_per_weight_counts_scales_and_zeros(bits: int, group: int, sym: bool, expected: float) -> None:
    code, total = LayerSpec(bits=bits, group_size=group, symmetric=sym).bits_per_weight(64, 4096)
    assert code == bits
    assert total == pytest.approx(expected)
