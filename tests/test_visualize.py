"""Palettes: class colours from the config, VOC's otherwise, the ignore colour at 255."""

import numpy as np
import pytest

from segtrain.errors import ConfigError
from segtrain.visualize import IGNORE_COLOR, make_palette, voc_palette


def test_configured_colours_come_first_and_255_is_the_ignore_colour():
    palette = make_palette([[1, 2, 3], [4, 5, 6]], 2)
    assert palette.shape == (256, 3) and palette.dtype == np.uint8
    assert palette[:2].tolist() == [[1, 2, 3], [4, 5, 6]]
    assert np.array_equal(palette[2:255], voc_palette(256)[2:255])
    assert tuple(palette[255]) == IGNORE_COLOR
    assert np.array_equal(make_palette(None, 21)[:255], voc_palette(256)[:255])


@pytest.mark.parametrize("colors,needle", [
    ([[0, 0, 0]], "got 1 colours for 3 classes"),
    ([[0, 0, 0], [1, 1], [2, 2, 2]], "some entries are not [r, g, b] triples"),
    ([[0, 0, 0], [1, 1, 1], [256, 0, 0]], "got a value of 256"),
    ([[0, 0, 0], [1, 1, 1], [0.5, 0, 0]], "got [[0, 0, 0], [1, 1, 1], [0.5, 0, 0]]"),
    ([[0, 0, 0]] * 256, "got 256 colours for 3 classes"),
])
def test_a_palette_that_cannot_colour_the_classes_is_a_config_error(colors, needle):
    with pytest.raises(ConfigError) as info:
        make_palette(colors, 3)
    message = str(info.value)
    assert message.startswith("dataset.palette must be null (the VOC colour map) or one [r, g, b] colour")
    assert needle in message and "\n" not in message
