"""BoxCodec: round trips within half a bin, decoded boxes always valid, and clear errors."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from ofa_ufo.core.box_codec import BoxCodec

NORMALIZED = BoxCodec()
OFA = BoxCodec(mode="ofa")
BINS = NORMALIZED.num_bins - 1  # 999 steps
FEW = settings(max_examples=200, deadline=None)

sides = st.integers(1, 5000)
input_sides = st.integers(32, 1024)
fractions = st.lists(st.floats(0.0, 1.0), min_size=4, max_size=4)


def _box(frac: list[float], w: float, h: float) -> np.ndarray:
    """A valid x0 <= x1, y0 <= y1 box covering the given fractions of a w x h extent."""
    xs, ys = sorted(frac[0::2]), sorted(frac[1::2])
    return np.array([xs[0] * w, ys[0] * h, xs[1] * w, ys[1] * h])


def _assert_valid(decoded: np.ndarray, w: float, h: float) -> None:
    assert decoded.dtype == np.float64 and decoded.shape[1] == 4
    x0, y0, x1, y1 = decoded.T
    assert np.all((0 <= x0) & (x0 <= x1) & (x1 <= w))
    assert np.all((0 <= y0) & (y0 <= y1) & (y1 <= h))


@FEW
@given(w=sides, h=sides, frac=fractions)
def test_normalized_round_trip_within_half_bin(w, h, frac):
    box = _box(frac, w, h)
    bins = NORMALIZED.encode(box, (w, h))
    assert bins.dtype == np.int64 and bins.shape == (1, 4)
    assert np.all((bins >= 0) & (bins <= BINS))
    decoded = NORMALIZED.decode(bins, (w, h))[0]
    half_bin = 0.5 * np.array([w, h, w, h]) / BINS
    assert np.all(np.abs(decoded - box) <= half_bin * (1 + 1e-9))


@FEW
@given(w=sides, h=sides, in_w=input_sides, in_h=input_sides, frac=fractions)
def test_ofa_round_trip_within_half_bin(w, h, in_w, in_h, frac):
    # Only the part of the image that maps inside max_image_size (512) is representable.
    extent_w, extent_h = min(w, 512 * w / in_w), min(h, 512 * h / in_h)
    box = _box(frac, extent_w, extent_h)
    bins = OFA.encode(box, (w, h), input_size=(in_w, in_h))
    decoded = OFA.decode(bins, (w, h), input_size=(in_w, in_h))[0]
    half_bin = 0.5 * 512 / BINS * np.array([w / in_w, h / in_h, w / in_w, h / in_h])
    assert np.all(np.abs(decoded - box) <= half_bin * (1 + 1e-9))


@FEW
@given(
    w=sides,
    h=sides,
    in_w=input_sides,
    in_h=input_sides,
    bins=arrays(np.int64, st.tuples(st.integers(1, 5), st.just(4)), elements=st.integers(0, BINS)),
)
def test_decode_any_bins_is_valid(w, h, in_w, in_h, bins):
    _assert_valid(NORMALIZED.decode(bins, (w, h)), w, h)
    _assert_valid(OFA.decode(bins, (w, h), input_size=(in_w, in_h)), w, h)


def test_ofa_mode_saturates_beyond_max_image_size():
    # 1024 px input: the right/bottom half of the input lies beyond 512 and clips to the last bin.
    bins = OFA.encode([0, 0, 2000, 1000], (2000, 1000), input_size=(1024, 1024))
    assert bins.tolist() == [[0, 0, BINS, BINS]]
    assert OFA.decode(bins, (2000, 1000), input_size=(1024, 1024)).tolist() == [[0, 0, 1000, 500]]


def test_ofa_mode_at_512_matches_normalized():
    box, size = [12.5, 40.0, 300.0, 511.0], (640, 512)
    assert OFA.encode(box, size, input_size=(512, 512)).tolist() == NORMALIZED.encode(box, size).tolist()


def test_known_values_and_shapes():
    bins = NORMALIZED.encode([[0, 0, 640, 480], [320, 240, 320, 240]], (640, 480))
    assert bins.tolist() == [[0, 0, 999, 999], [500, 500, 500, 500]]  # 499.5 rounds half to even
    assert NORMALIZED.decode([999, 0, 0, 999], (640, 480)).tolist() == [[0.0, 0.0, 640.0, 480.0]]
    assert NORMALIZED.encode(np.zeros((0, 4)), (5, 5)).shape == (0, 4)
    assert NORMALIZED.decode([], (5, 5)).shape == (0, 4)


def test_tolerance_at_the_border():
    bins = NORMALIZED.encode([0, -1e-5, 640 * (1 + 1e-7), 480], (640, 480))
    assert bins.tolist() == [[0, 0, 999, 999]]


def test_to_text_and_token_ids():
    assert NORMALIZED.to_text([1, 2, 3, 4]) == "<bin_1> <bin_2> <bin_3> <bin_4>"
    assert NORMALIZED.to_text(np.array([[1, 2, 3, 4], [5, 6, 7, 8]])) == [
        "<bin_1> <bin_2> <bin_3> <bin_4>",
        "<bin_5> <bin_6> <bin_7> <bin_8>",
    ]
    offset = 58457
    assert NORMALIZED.from_token_ids([offset, offset + 999], offset).tolist() == [0, 999]
    assert NORMALIZED.from_token_ids([[offset + 1] * 4], offset).shape == (1, 4)
    with pytest.raises(ValueError, match="token id 50264 is not a bin token"):
        NORMALIZED.from_token_ids([offset, 50264], offset)
    with pytest.raises(ValueError, match="token id 59457"):
        NORMALIZED.from_token_ids([59457], offset)


@pytest.mark.parametrize(
    "box, size, match",
    [
        ([0, 0, 641, 10], (640, 480), r"box \[0\.0, 0\.0, 641\.0, 10\.0\] lies outside the image.*\(640, 480\)"),
        ([-1, 0, 10, 10], (640, 480), "outside the image"),
        ([10, 0, 5, 10], (640, 480), r"negative width or height.*\(640, 480\)"),
        ([0, 10, 5, 2], (640, 480), "negative width or height"),
        ([0, 0, float("nan"), 10], (640, 480), "non-finite"),
        ([0, 0, 1], (640, 480), r"shape \(4,\) or \(N, 4\), got shape \(3,\)"),
        ([[0, 0, 1, 1, 1]], (640, 480), "got shape"),
        ([0, 0, 1, 1], (0, 480), "image_size must be positive"),
        ([0, 0, 1, 1], (640, -1), "image_size must be positive"),
        ([0, 0, 1, 1], (640,), "image_size must be a"),
    ],
)
def test_encode_errors(box, size, match):
    with pytest.raises(ValueError, match=match):
        NORMALIZED.encode(box, size)


def test_decode_and_mode_errors():
    with pytest.raises(ValueError, match="needs input_size"):
        OFA.encode([0, 0, 1, 1], (10, 10))
    with pytest.raises(ValueError, match="input_size must be positive"):
        OFA.decode([0, 0, 1, 1], (10, 10), input_size=(0, 10))
    with pytest.raises(ValueError, match="bin 1000 out of range"):
        NORMALIZED.decode([0, 0, 1000, 1], (10, 10))
    with pytest.raises(ValueError, match="integers"):
        NORMALIZED.decode([0.5, 0, 1, 1], (10, 10))
    with pytest.raises(ValueError, match="mode must be"):
        BoxCodec(mode="pixels")
    with pytest.raises(ValueError, match="num_bins"):
        BoxCodec(num_bins=1)
