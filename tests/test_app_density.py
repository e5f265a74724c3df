"""The map image and the server-side lasso geometry (explorer.app.density): pure numpy."""

from __future__ import annotations

import numpy as np
import pytest

from explorer.app import density as D


def reference_inside(px, py, x, y):
    """Even-odd rule, every point against every edge (slow, obviously right)."""
    inside = np.zeros(len(x), dtype=bool)
    n = len(px)
    for i in range(n):
        ax, ay, bx, by = px[i], py[i], px[(i + 1) % n], py[(i + 1) % n]
        crosses = (ay > y) != (by > y)
        with np.errstate(divide="ignore", invalid="ignore"):
            xint = ax + (y - ay) * (bx - ax) / (by - ay)
        inside ^= crosses & (x < xint)
    return np.flatnonzero(inside)


@pytest.fixture
def cloud():
    rng = np.random.default_rng(3)
    return rng.normal(0, 3, 20_000).astype(np.float32), rng.normal(0, 3, 20_000).astype(np.float32)


def test_polygon_matches_the_plain_even_odd_rule(cloud):
    x, y = cloud
    t = np.linspace(0, 2 * np.pi, 60, endpoint=False)
    r = 4 + 2.5 * np.sin(5 * t)  # a concave star, like a hand-drawn lasso
    px, py = r * np.cos(t) + 0.5, r * np.sin(t) - 0.3
    got = D.points_in_polygon(x, y, px, py)
    want = reference_inside(px, py, x.astype(np.float64), y.astype(np.float64))
    assert 1000 < len(want) < len(x) - 1000
    assert np.array_equal(got, want)
    # a self-crossing "bow tie" and a polygon with repeated / horizontal vertices
    for px, py in (([-5, 5, 5, -5], [-5, 5, -5, 5]), ([-4, 0, 0, 4, 4, 4, -4], [-2, -2, -2, -2, 3, 3, 3])):
        px, py = np.asarray(px, float), np.asarray(py, float)
        assert np.array_equal(D.points_in_polygon(x, y, px, py), reference_inside(px, py, x.astype(float), y.astype(float)))


def test_degenerate_polygons_select_nothing(cloud):
    x, y = cloud
    assert len(D.points_in_polygon(x, y, [0, 1], [0, 1])) == 0
    assert len(D.points_in_polygon(x, y, [0, 1, np.nan], [0, 1, 2])) == 0
    assert len(D.points_in_polygon(x, y, [50, 60, 60], [50, 50, 60])) == 0  # nowhere near the points
    with pytest.raises(ValueError, match="shapes"):
        D.points_in_polygon(x, y, [0, 1, 2], [0, 1])


def test_rect_and_click(cloud):
    x, y = cloud
    got = D.points_in_rect(x, y, (1, -1, 2, -2))  # corners in any order
    assert np.array_equal(got, np.flatnonzero((np.abs(x) <= 1) & (np.abs(y) <= 2)))
    i = 123
    hit = D.nearest_point(x, y, (float(x[i]) + 1e-4, float(y[i])), (0.01, 0.01))
    assert hit == i
    assert D.nearest_point(x, y, (500.0, 500.0), (0.01, 0.01)) is None
    with pytest.raises(ValueError, match="radius"):
        D.nearest_point(x, y, (0, 0), (0, 1))


def rgba(shaded):
    return shaded.image.view(np.uint8).reshape(*shaded.image.shape, 4)


def test_shade_puts_each_point_in_its_pixel_with_its_colour():
    colors = D.rgb_table(["#ff0000", "#0000ff"])
    x = np.array([0.5, 9.5, 9.5, 50.0, np.nan], np.float32)
    y = np.array([9.5, 0.5, 0.5, 5.0, 1.0], np.float32)
    codes = np.array([0, 1, 1, 0, 0], np.int32)
    s = D.shade(x, y, codes, colors, np.array([0.8, 0.8]), (0, 10, 0, 10), (10, 20))
    img = rgba(s)
    assert s.n_drawn == 3  # the point at x=50 is out of view, the NaN is never drawn
    assert img.shape == (10, 20, 4)
    # row 0 is the bottom (y=0), as Bokeh's image_rgba draws it
    top_left, bottom_right = img[9, 1], img[0, 19]
    assert tuple(top_left[:3]) == (255, 0, 0) and tuple(bottom_right[:3]) == (0, 0, 255)
    assert bottom_right[3] > top_left[3] > 0  # two points are more opaque than one
    assert (img[..., 3] > 0).sum() == 2  # nothing else is lit
    spread = rgba(D.shade(x, y, codes, colors, np.array([0.8, 0.8]), (0, 10, 0, 10), (10, 20), radius=1))
    assert (spread[..., 3] > 0).sum() > 2


def test_selection_dims_the_other_points():
    x = np.array([1.5, 1.5, 7.5], np.float32)
    y = np.array([1.5, 1.5, 7.5], np.float32)
    codes = np.array([0, 1, 1], np.int32)
    colors = D.rgb_table(["#ff0000", "#0000ff"])
    sel = np.array([True, False, False])
    img = rgba(D.shade(x, y, codes, colors, np.array([0.8, 0.8]), (0, 10, 0, 10), (10, 10), selected=sel))
    mixed, other = img[1, 1], img[7, 7]
    assert mixed[0] > 200 and mixed[2] < 40  # the selected (red) point's colour wins its pixel
    assert mixed[3] > 2 * other[3] and other[3] > 0  # the unselected one is faint, not gone
    plain = rgba(D.shade(x, y, codes, colors, np.array([0.8, 0.8]), (0, 10, 0, 10), (10, 10)))
    assert plain[7, 7, 3] > other[3]


def test_bad_parameters_name_the_bad_value(monkeypatch):
    x = y = np.zeros(3, np.float32)
    codes = np.zeros(3, np.int32)
    colors, alphas = D.rgb_table(["#000000"]), np.ones(1)
    with pytest.raises(ValueError, match=r"\(0, 5\)"):
        D.shade(x, y, codes, colors, alphas, (0, 1, 0, 1), (0, 5))
    with pytest.raises(ValueError, match="radius"):
        D.shade(x, y, codes, colors, alphas, (0, 1, 0, 1), (5, 5), radius=-1)
    with pytest.raises(ValueError, match="non-empty"):
        D.shade(x, y, codes, colors, alphas, (1, 1, 0, 1), (5, 5))
    with pytest.raises(ValueError, match="finite"):
        D.shade(x, y, codes, colors, alphas, (0, np.inf, 0, 1), (5, 5))
    with pytest.raises(ValueError, match="lengths 3, 3, 2"):
        D.shade(x, y, codes[:2], colors, alphas, (0, 1, 0, 1), (5, 5))
    monkeypatch.setenv(D.THRESHOLD_ENV, "lots")
    with pytest.raises(ValueError, match="'lots'"):
        D.image_threshold()
    monkeypatch.setenv(D.THRESHOLD_ENV, "2000")
    assert D.image_threshold() == 2000
    monkeypatch.delenv(D.THRESHOLD_ENV)
    assert D.image_threshold() == D.IMAGE_THRESHOLD
