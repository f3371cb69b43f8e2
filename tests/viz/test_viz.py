import numpy as np
import pytest
from PIL import Image

from ddps_core.viz import colorize, grid, overlay, palette, save_png, triptych
from ddps_core.viz.palette import IGNORE_COLOR


def test_palette_is_fixed_and_distinct():
    p = palette(256)
    assert p.shape == (256, 3) and p.dtype == np.uint8
    # hand-computed from the bit interleaving: 1 -> red 128, 2 -> green 128, 3 -> (128,128,0),
    # 4 -> blue 128, 8 -> red 64 (bit 3 of the id goes to the next-lower bit of red)
    assert p[0].tolist() == [0, 0, 0]
    assert p[1].tolist() == [128, 0, 0]
    assert p[2].tolist() == [0, 128, 0]
    assert p[3].tolist() == [128, 128, 0]
    assert p[4].tolist() == [0, 0, 128]
    assert p[8].tolist() == [64, 0, 0]
    assert len({tuple(c) for c in p}) == 256


def test_colorize_maps_ids_and_ignore():
    label = np.array([[0, 1], [2, 255]], dtype=np.uint8)
    out = colorize(label)
    assert out[0, 1].tolist() == [128, 0, 0]
    assert out[1, 0].tolist() == [0, 128, 0]
    assert tuple(out[1, 1]) == IGNORE_COLOR


def test_overlay_blend_is_exact():
    image = np.full((2, 2, 3), 100, np.uint8)
    label = np.ones((2, 2), np.uint8)  # colour (128, 0, 0)
    out = overlay(image, label, alpha=0.5)
    assert out[0, 0].tolist() == [114, 50, 50]  # (100+128)/2, (100+0)/2


def test_triptych_layout_and_png(tmp_path):
    image = np.random.default_rng(0).integers(0, 255, (8, 10, 3), dtype=np.uint8)
    gt = np.zeros((8, 10), np.uint8)
    pred = np.ones((8, 10), np.uint8)
    tri = triptych(image, gt, pred, scale=2)
    assert tri.shape == (16, 3 * 20 + 2 * 2, 3)
    # first panel is the upscaled image itself
    assert np.array_equal(tri[:16, :20], np.repeat(np.repeat(image, 2, 0), 2, 1))
    path = tmp_path / "sub" / "t.png"
    save_png(tri, path)
    assert np.array_equal(np.asarray(Image.open(path)), tri)
    assert [p.name for p in path.parent.iterdir()] == ["t.png"]  # no temp files left


def test_grid_rejects_unequal_panels():
    with pytest.raises(ValueError):
        grid([[np.zeros((4, 4, 3), np.uint8), np.zeros((5, 4, 3), np.uint8)]])
