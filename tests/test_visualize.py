"""Palettes (class colours from the config, VOC's otherwise, the ignore colour at 255) and the TensorBoard panels."""

import numpy as np
import pytest

from segtrain.errors import ConfigError
from segtrain.visualize import IGNORE_COLOR, PANEL_GAP, make_palette, panel, voc_palette


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


def _legend_colours(picture, tiles_height):
    strip = picture[tiles_height:]
    return {tuple(c) for c in strip.reshape(-1, 3).tolist()}


def test_a_small_panel_is_enlarged_masks_by_nearest_neighbour_with_a_legend_of_the_classes_present():
    palette = make_palette([[0, 0, 0], [200, 0, 0], [0, 200, 0], [0, 0, 200]], 4)
    names = ["background", "road", "car", "sky"]
    image = np.full((32, 40, 3), 128, np.uint8)
    target = np.zeros((32, 40), np.int64)
    target[4:12, 4:12], target[30:, :] = 1, 255
    prediction = np.zeros((32, 40), np.int64)
    prediction[4:12, 20:30] = 2
    picture = panel(image, target, prediction, palette, names)
    factor = 8  # ceil(256 / 32): the shorter side reaches 256
    tile_h, tile_w = 32 * factor, 40 * factor
    assert picture.dtype == np.uint8 and picture.shape[1] == 3 * tile_w + 2 * PANEL_GAP and picture.shape[0] > tile_h
    truth = picture[:tile_h, tile_w + PANEL_GAP:2 * tile_w + PANEL_GAP]
    assert {tuple(c) for c in truth.reshape(-1, 3).tolist()} == {(0, 0, 0), (200, 0, 0), IGNORE_COLOR}  # no blends
    assert (truth[4 * factor:12 * factor, 4 * factor:12 * factor] == (200, 0, 0)).all()
    colours = _legend_colours(picture, tile_h)
    assert {(0, 0, 0), (200, 0, 0), (0, 200, 0), IGNORE_COLOR} <= colours  # swatches: in either mask
    assert (0, 0, 200) not in colours  # sky is in neither


def test_a_large_panel_keeps_its_size():
    palette = make_palette(None, 2)
    image = np.zeros((300, 400, 3), np.uint8)
    mask = np.zeros((300, 400), np.int64)
    picture = panel(image, mask, mask, palette, ["background", "thing"])
    assert picture.shape[1] == 3 * 400 + 2 * PANEL_GAP and picture.shape[0] > 300
    assert (picture[300:] != 255).any()  # the legend has its one entry
