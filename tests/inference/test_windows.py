"""image_groups: consecutive images cut so that each group holds at most the given number of
model inputs (every test-time view counted), an image with more alone."""

from ddps_core.inference.windows import image_groups


def test_groups_count_windows_and_views():
    shapes = [(96, 64), (64, 160), (32, 32), (32, 32), (64, 160)]
    # whole: one input per image
    assert image_groups(shapes, 32, "whole", windows=2) == [[0, 1], [2, 3], [4]]
    # slide at S = 32, stride 22: 2, 4, 1, 1, 4 windows
    assert image_groups(shapes, 32, "slide", windows=4) == [[0], [1], [2, 3], [4]]
    assert image_groups(shapes, 32, "slide", windows=6) == [[0, 1], [2, 3, 4]]
    assert image_groups(shapes, 32, "slide", windows=1) == [[0], [1], [2], [3], [4]]
    # each test-time view counts: flip doubles an image's inputs, so does a second scale
    assert image_groups(shapes[:3], 32, "whole", windows=2, flip=True) == [[0], [1], [2]]
    assert image_groups([(32, 32)] * 3, 32, "slide", windows=5, scales=[1.0, 2.0]) == [[0, 1], [2]]
    assert image_groups([(32, 32)] * 3, 32, "slide", windows=5, flip=True, scales=[1.0, 2.0]) == [[0], [1], [2]]
    assert image_groups([], 32) == []
