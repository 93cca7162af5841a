"""The topology figure: tick values, and where the image puts each curve, dot and line."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from iso_lightning.plots import PALETTE, ROW_HEIGHT, WIDTH, nice_ticks, topology_image


def _rgb(colour):
    return tuple(int(colour[i:i + 2], 16) for i in (1, 3, 5))


def _width_row(width, low, high):
    """The pixel row of ``width`` on the widths panel, whose y axis spans ``[low, high]`` on rows 40 to its bottom."""
    bottom = 40 + ROW_HEIGHT
    return int(round(bottom - (width - low) / (high - low) * (bottom - 40)))


def _count(pixels, colour):
    return int((pixels == np.array(colour, dtype=np.uint8)).all(axis=-1).sum())


@settings(max_examples=200, deadline=None)
@given(st.floats(-1e6, 1e6), st.floats(1e-6, 1e6))
def test_nice_ticks_are_evenly_spaced_round_values_inside_the_range(lo, span):
    hi = lo + span
    ticks = nice_ticks(lo, hi)
    assert 2 <= len(ticks) <= 11
    step = ticks[1] - ticks[0]
    # Relative tolerance: round-off of values of size |lo| measured against a (possibly tiny) step.
    tol = 1e-6 + 1e-12 * max(1.0, abs(lo), abs(hi)) / step
    mantissa = step / 10 ** math.floor(math.log10(step))
    assert min(abs(mantissa - m) for m in (1, 2, 5, 10)) < tol * 10
    assert all(abs((b - a) - step) <= tol * step for a, b in zip(ticks, ticks[1:]))
    scale = 1e-9 * max(1.0, abs(lo), abs(hi))  # round-off at the range's magnitude
    assert lo - scale <= ticks[0] and ticks[-1] <= hi + scale
    assert ticks[0] - step < lo + scale and ticks[-1] + step > hi - scale  # no round value left out


def test_nice_ticks_of_an_empty_range_is_its_one_value():
    assert nice_ticks(3.0, 3.0) == [3.0]


def _record(epoch, step, space, values):
    return {"epoch": epoch, "step": step, "space": space, "width": len(values), "singular_values": values}


def test_the_image_has_one_row_per_space_and_the_spaces_colours():
    history = [_record(e, 10 * (e + 1), s, [2.0, 1.0, 0.5]) for e in range(3) for s in ("a", "b", "c")]
    image = topology_image(history, threshold=0.9)
    assert image.mode == "RGB" and image.size == (WIDTH, 40 + 3 * ROW_HEIGHT + 50)
    pixels = np.asarray(image)
    for colour in PALETTE[:3]:
        assert _count(pixels, _rgb(colour)) > 50  # its width curve and its dots
    assert _count(pixels, _rgb(PALETTE[3])) == 0


def test_a_singular_value_is_a_dot_where_the_axes_put_it():
    # One space, one epoch, one value 1.0, threshold 0.5: the spectrum panel spans x in [-0.5, 0.5],
    # y in [0, 1.06], on the pixel box (540, 50) to (WIDTH - 25, 40 + ROW_HEIGHT - 45).
    image = topology_image([_record(0, 5, "hidden", [1.0])], threshold=0.5)
    pixels = np.asarray(image)
    left, top, right, bottom = 540, 50, WIDTH - 25, 40 + ROW_HEIGHT - 45
    x = left + 0.5 * (right - left)
    y = bottom - (1.0 / 1.06) * (bottom - top)
    blue = np.array(_rgb(PALETTE[0]), dtype=np.uint8)
    assert (pixels[int(round(y)), int(round(x))] == blue).all()
    assert not (pixels[int(round(y)) + 12, int(round(x))] == blue).all()  # a dot, not a column
    # The threshold is a dashed crimson line at y(0.5), across the panel.
    y_threshold = int(round(bottom - (0.5 / 1.06) * (bottom - top)))
    crimson = (pixels[y_threshold - 1:y_threshold + 2, left:right] == np.array([220, 20, 60], dtype=np.uint8))
    assert 0.3 < crimson.all(axis=-1).any(axis=0).mean() < 0.7


def test_the_width_curve_steps_at_each_change():
    history = [_record(0, 100, "h", [1.0] * 4), _record(1, 200, "h", [1.0] * 8)]
    events = [{"step": 100, "space": "h", "op": "grow", "new_width": 8}]
    pixels = np.asarray(topology_image(history, events))
    blue = np.array(_rgb(PALETTE[0]), dtype=np.uint8)
    # The widths panel spans steps [0, 200] on x in [70, 450] and widths [4 - 1, 8 + 1] on y.
    assert (pixels[_width_row(4, 3, 9), 120] == blue).all()  # width 4 before step 100
    assert (pixels[_width_row(8, 3, 9), 400] == blue).all()  # width 8 after it
    assert not (pixels[_width_row(8, 3, 9), 120] == blue).all() and not (pixels[_width_row(4, 3, 9), 400] == blue).all()


def test_no_threshold_draws_no_threshold_line_and_non_finite_values_are_left_out():
    history = [_record(0, 1, "h", [1.0, float("nan"), float("inf"), 0.5])]
    pixels = np.asarray(topology_image(history))
    assert _count(pixels, (220, 20, 60)) == 0
    assert _count(pixels, _rgb(PALETTE[0])) > 0


@pytest.mark.parametrize("spaces", [0, 12])
def test_no_history_and_more_spaces_than_colours_still_draw(spaces):
    history = [_record(0, 1, f"blocks.{i}.ffn.hidden_with_a_long_name", [1.0]) for i in range(spaces)]
    image = topology_image(history)
    assert image.size == (WIDTH, 40 + max(1, spaces) * ROW_HEIGHT + 50)
    pixels = np.asarray(image)
    assert (pixels < 128).all(axis=-1).sum() > 100  # text and frames were drawn
    if spaces:
        assert _count(pixels, _rgb(PALETTE[0])) > _count(pixels, _rgb(PALETTE[2]))  # colours cycle: 0 twice


def test_a_change_before_the_first_snapshot_starts_the_curve_at_its_old_width():
    history = [_record(0, 200, "h", [1.0] * 8)]
    events = [{"step": 100, "space": "h", "op": "grow", "old_width": 4, "new_width": 8}]
    pixels = np.asarray(topology_image(history, events))
    blue = np.array(_rgb(PALETTE[0]), dtype=np.uint8)
    assert (pixels[_width_row(4, 3, 9), 120] == blue).all()  # width 4 until step 100
    assert (pixels[_width_row(8, 3, 9), 400] == blue).all()
