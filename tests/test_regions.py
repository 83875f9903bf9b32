"""pipeline.regions: crops and region weights, exact values on hand-computed cases."""

from __future__ import annotations

from typing import get_args

import numpy as np
import pytest
from PIL import Image

from pipeline import regions
from pipeline.config import Embed


def test_crop_boxes_without_margin_round_outward_and_clip():
    boxes = np.array([[10.2, 20.0, 30.7, 40.0], [-3.0, 5.0, 130.0000001, 60.5]], dtype=np.float32)
    got = regions.crop_boxes(boxes, width=120, height=80)
    assert got.tolist() == [[10, 20, 31, 40], [0, 5, 120, 61]]
    assert got.dtype == np.int64


def test_crop_boxes_margin_is_a_fraction_of_each_side_clipped_to_the_image():
    boxes = np.array([[20, 10, 60, 30], [0, 0, 10, 10]], dtype=np.float32)  # 40 × 20, 10 × 10
    got = regions.crop_boxes(boxes, width=100, height=50, margin=0.25)
    # 10 px left/right and 5 px top/bottom; the second box is clipped at the top-left corner.
    assert got.tolist() == [[10, 5, 70, 35], [0, 0, 13, 13]]
    assert regions.crop_boxes(boxes, 100, 50, margin=5.0).tolist() == [[0, 0, 100, 50], [0, 0, 60, 50]]


def test_degenerate_boxes_still_cut_one_pixel_inside_the_image():
    boxes = np.array([[50, 20, 50, 20], [100, 50, 100, 50], [7.5, 3.0, 7.5, 3.0]], dtype=np.float32)
    got = regions.crop_boxes(boxes, width=100, height=50)
    assert got.tolist() == [[50, 20, 51, 21], [99, 49, 100, 50], [7, 3, 8, 4]]
    assert regions.crop_boxes(np.zeros((0, 4)), 100, 50).shape == (0, 4)


def test_area_fractions_are_of_the_image_and_clipped_to_it():
    boxes = np.array([[0, 0, 50, 25], [90, 40, 110, 60], [10, 10, 10, 30]], dtype=np.float32)
    got = regions.area_fractions(boxes, width=100, height=50)
    assert got.tolist() == pytest.approx([0.25, 10 * 10 / 5000, 0.0])
    assert got.dtype == np.float32


def test_the_whole_image_is_region_0_with_confidence_1_and_area_1():
    boxes, conf, area = regions.with_whole_image(np.array([[0, 0, 10, 10]]), np.array([0.5]), 20, 10)
    assert boxes.tolist() == [[0, 0, 20, 10], [0, 0, 10, 10]]
    assert conf.tolist() == [1.0, 0.5] and area.tolist() == [1.0, 0.5]
    boxes, conf, area = regions.with_whole_image(np.zeros((0, 4)), np.zeros(0), 20, 10)
    assert boxes.tolist() == [[0, 0, 20, 10]] and conf.tolist() == [1.0] and area.tolist() == [1.0]


def test_crops_start_with_the_whole_image():
    image = Image.new("RGB", (40, 30))
    got = regions.crops(image, np.array([[1, 2, 11, 7], [0, 0, 40, 30]]))
    assert got[0] is image
    assert [c.size for c in got] == [(40, 30), (10, 5), (40, 30)]


def test_cosines_hand_computed_and_zero_for_a_zero_vector():
    r = np.array([[1, 0], [1, 1], [0, -2], [0, 0]], dtype=np.float16)
    got = regions.cosines(r, np.array([2, 0], dtype=np.float16))
    assert got.tolist() == pytest.approx([1.0, 2**-0.5, 0.0, 0.0], abs=1e-6)


CONF = np.array([1.0, 0.8, 0.5])
AREA = np.array([1.0, 0.25, 0.1])
SIM = np.array([0.5, 0.8, -0.3])  # the third points away from the caption: counts as 0


@pytest.mark.parametrize(
    ("combination", "factors"),
    [
        ("product", [1.0 * 1.0 * 0.5, 0.8 * 0.25 * 0.8, 0.0]),  # 0.5, 0.16, 0
        ("conf", [1.0, 0.8, 0.5]),
        ("area", [1.0, 0.25, 0.1]),
        ("sim", [0.5, 0.8, 0.0]),
        ("uniform", [1.0, 1.0, 1.0]),
    ],
)
def test_region_weights_hand_computed(combination, factors):
    got = regions.region_weights(CONF, AREA, SIM, combination)
    want = np.array(factors) / sum(factors)
    assert got.dtype == np.float32
    assert got.tolist() == pytest.approx(want.tolist(), abs=1e-7)
    assert got.sum() == pytest.approx(1.0, abs=1e-6)


def test_product_weights_of_the_paper_example():
    got = regions.region_weights(CONF, AREA, SIM, "product")
    assert got.tolist() == pytest.approx([0.5 / 0.66, 0.16 / 0.66, 0.0], abs=1e-7)


def test_all_zero_factors_fall_back_to_uniform():
    sims = np.array([-0.2, 0.0, -1.0, -0.5])
    ones = np.ones(4)
    assert regions.region_weights(ones, ones, sims, "product").tolist() == [0.25] * 4
    assert regions.region_weights(ones, ones, sims, "sim").tolist() == [0.25] * 4
    # A lone whole image pointing away from its caption still gets all the weight.
    assert regions.region_weights([1.0], [1.0], [-0.1]).tolist() == [1.0]
    # Zero-area boxes under `area`, with the whole image present: not all zero, no fallback.
    assert regions.region_weights(ones[:2], [1.0, 0.0], ones[:2], "area").tolist() == [1.0, 0.0]


def test_region_weights_refuse_bad_input():
    with pytest.raises(ValueError, match="unknown combination 'max'"):
        regions.region_weights(CONF, AREA, SIM, "max")
    with pytest.raises(ValueError, match="three equal"):
        regions.region_weights(CONF, AREA[:2], SIM)
    with pytest.raises(ValueError, match="R >= 1"):
        regions.region_weights([], [], [])


def test_the_params_choices_are_the_combinations():
    assert get_args(Embed.model_fields["weights"].annotation) == regions.COMBINATIONS
