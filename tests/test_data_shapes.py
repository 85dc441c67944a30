import math
import re

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from trp.data import (
    COLOR_NAMES,
    COLORS,
    MAX_KEYPOINTS,
    NUM_KEYPOINTS,
    PROMPT_TYPES,
    SHAPE_CLASSES,
    TASKS,
    Referent,
    Scene,
    SceneFacts,
    ShapesDataset,
    collate,
    refer,
    refer_any,
    resolve,
    sample_scene,
    visual_prompt,
)
from trp.data.referring import is_unambiguous
from trp.data.scene import rasterize_shape

_COLOR = "|".join(COLOR_NAMES)
_SHAPE = "|".join(SHAPE_CLASSES)
_EXPRESSION = re.compile(
    rf"^(?:the )?(?:(?P<size>big|small) )?(?:(?P<color>{_COLOR}) )?(?P<shape>{_SHAPE})"
    r"(?: (?P<position>on the left|on the right|at the top|at the bottom)"
    rf"| (?P<relation>to the left of|to the right of|above|below) the "
    rf"(?:(?P<acolor>{_COLOR}) )?(?P<ashape>{_SHAPE}))?$"
)
_WORDS = {"on the left": "left", "on the right": "right", "at the top": "top",
          "at the bottom": "bottom", "to the left of": "left of", "to the right of": "right of",
          "above": "above", "below": "below"}


def parse_expression(text: str) -> Referent:
    """An independent reading of the generator's English back into a Referent."""
    m = _EXPRESSION.match(text)
    assert m is not None, f"unparseable expression {text!r}"
    anchor = Referent(m["ashape"], m["acolor"]) if m["ashape"] else None
    return Referent(m["shape"], m["color"], m["size"], _WORDS.get(m["position"] or ""),
                    _WORDS.get(m["relation"] or ""), anchor)


def test_samples_are_deterministic_and_order_independent():
    a = ShapesDataset(num_samples=20, seed=7, task="rec")
    b = ShapesDataset(num_samples=20, seed=7, task="rec")
    forward = [a[i] for i in range(20)]
    backward = [b[i] for i in reversed(range(20))][::-1]
    for x, y in zip(forward, backward):
        assert torch.equal(x["image"], y["image"])
        assert x["expression"] == y["expression"]
        assert torch.equal(x["box"], y["box"])
        assert torch.equal(x["mask"], y["mask"])
    other = ShapesDataset(num_samples=20, seed=8, task="rec")
    assert sum(torch.equal(other[i]["image"], forward[i]["image"]) for i in range(20)) == 0


@pytest.mark.parametrize("task", TASKS)
def test_sample_keys_shapes_and_types(task):
    ds = ShapesDataset(num_samples=8, seed=1, image_size=(64, 96), task=task)
    s = ds[3]
    assert s["index"] == 3
    assert s["task"] == task
    assert s["image"].shape == (3, 64, 96)
    assert s["image"].dtype == torch.float32
    assert s["image"].min() >= 0.0
    assert s["image"].max() <= 1.0
    if task in ("rec", "res", "caption"):
        assert s["box"].shape == (4,)
        assert s["mask"].shape == (64, 96)
        assert s["mask"].dtype == torch.bool
        assert s["label"] in range(len(SHAPE_CLASSES))
    if task in ("rec", "res"):
        assert isinstance(s["expression"], str)
        assert s["expression_kind"] in ("attribute", "position", "relation")
    if task == "caption":
        assert s["prompt_type"] in PROMPT_TYPES
        assert s["prompt_mask"].shape == (64, 96)
        assert re.match(rf"a (small|medium|large) ({_COLOR}) ({_SHAPE})", s["caption"])
    if task in ("det", "keypoints"):
        n = s["boxes"].shape[0]
        assert n >= 1
        assert s["masks"].shape == (n, 64, 96)
        assert s["labels"].tolist() == [
            s["label"]] * n
        assert s["category"] == SHAPE_CLASSES[s["label"]]
    if task == "keypoints":
        assert s["keypoints"].shape == (s["boxes"].shape[0], MAX_KEYPOINTS, 3)
        k = NUM_KEYPOINTS[s["category"]]
        assert (s["keypoints"][:, :k, 2] > 0).all()
        assert (s["keypoints"][:, k:] == 0).all()
    if task == "depth":
        assert s["depth"].shape == (64, 96)
        assert s["depth"].max() == 10.0
        assert s["depth"].min() >= 2.0


def _mask_box(mask: torch.Tensor) -> list[float]:
    rows, cols = torch.nonzero(mask, as_tuple=True)
    return [cols.min().item(), rows.min().item(), cols.max().item() + 1, rows.max().item() + 1]


def test_expressions_resolve_to_exactly_the_target():
    ds = ShapesDataset(num_samples=100, seed=11, task="res")
    kinds = set()
    for i in range(len(ds)):
        s = ds[i]
        scene = ds.scene(i)
        pixels = (s["image"] * 255).round().to(torch.uint8).numpy()
        assert np.array_equal(scene.image.transpose(2, 0, 1), pixels)
        matches = [j for j in range(scene.num_shapes)
                   if np.array_equal(scene.label_map == j, s["mask"].numpy())]
        assert len(matches) == 1
        target = matches[0]
        assert s["box"].tolist() == _mask_box(s["mask"])
        ref = parse_expression(s["expression"])
        facts = SceneFacts.from_scene(scene)
        assert resolve(ref, facts, generous=True) == [target], s["expression"]
        assert target in resolve(ref, facts, generous=False)
        kinds.add(ref.kind)
    assert kinds == {"attribute", "position", "relation"}


def _facts(shapes, colors, areas, centers) -> SceneFacts:
    return SceneFacts(tuple(shapes), tuple(colors), tuple(areas),
                      tuple(map(tuple, centers)), side=128.0)


def test_resolver_on_a_hand_made_scene():
    facts = _facts(["circle", "circle", "star", "square"], ["red", "blue", "red", "red"],
                   [400, 100, 300, 300], [(20, 30), (100, 90), (60, 60), (62, 100)])
    assert Referent("circle", position="left").text() == "the circle on the left"
    assert is_unambiguous(Referent("circle", position="left"), facts, 0)
    assert is_unambiguous(Referent("circle", position="bottom"), facts, 1)
    assert is_unambiguous(Referent("circle", "red"), facts, 0)
    assert Referent("circle", "red").text() == "red circle"
    assert is_unambiguous(Referent("circle", size="big"), facts, 0)  # 400 >= 1.5 * 100
    assert Referent("circle", size="big").text() == "the big circle"
    # A lone star is not "the star on the left"; "the circle" matches two objects.
    assert resolve(Referent("star", position="left"), facts, generous=True) == []
    assert resolve(Referent("circle"), facts, generous=True) == [0, 1]
    above = Referent("circle", relation="above", anchor=Referent("star"))
    assert above.text() == "the circle above the star"
    assert is_unambiguous(above, facts, 0)
    # The square is 40 px below the star but only 2 px right of it: "right of" is not clear.
    right = Referent("square", relation="right of", anchor=Referent("star"))
    assert target_is_rejected(right, facts, 3)
    # "the red thing above the circle" fails: two circles make the anchor ambiguous.
    assert resolve(Referent("star", relation="above", anchor=Referent("circle")), facts,
                   generous=True) == []


def target_is_rejected(ref, facts, target):
    return not is_unambiguous(ref, facts, target)


def test_speaker_honours_kind_weights_and_checks_uniqueness():
    facts = _facts(["circle", "circle", "star"], ["red", "blue", "red"], [400, 100, 300],
                   [(20, 30), (100, 90), (60, 60)])
    rng = np.random.default_rng(0)
    for weights, kind in (((0, 1, 0), "position"), ((0, 0, 1), "relation"),
                          ((1, 0, 0), "attribute")):
        ref = refer(facts, 1, rng, kind_weights=weights)
        assert ref.kind == kind
        assert is_unambiguous(ref, facts, 1)
        target, ref = refer_any(facts, rng, kind_weights=weights)
        assert ref.kind == kind
        assert is_unambiguous(ref, facts, target)
    # Two identical circles side by side at the same height: no words tell them apart.
    twins = _facts(["circle", "circle"], ["red", "red"], [100, 100], [(40, 60), (44, 60)])
    assert refer_any(twins, rng) is None
    with pytest.raises(ValueError, match="kind_weights"):
        refer(facts, 0, rng, kind_weights=(0, 0, 0))
    with pytest.raises(ValueError, match="kind_weights"):
        ShapesDataset(num_samples=4, kind_weights=(1, -1, 0))


def test_near_ties_are_rejected():
    facts = _facts(["circle", "circle"], ["red", "blue"], [300, 250], [(50, 40), (54, 90)])
    # 4 px apart horizontally (< 6% of 128) and areas within 1.5x: neither is clearly left/big.
    assert not is_unambiguous(Referent("circle", position="left"), facts, 0)
    assert not is_unambiguous(Referent("circle", size="big"), facts, 0)
    assert is_unambiguous(Referent("circle", position="top"), facts, 0)


_STAR_AREA = 5 * 0.45 * math.sin(math.pi / 5) * 20**2  # 10 triangles centre-tip-inner vertex
_CROSS_AREA = 8 * 20 * (0.32 * 20) - 4 * (0.32 * 20) ** 2  # two bars minus their overlap


@pytest.mark.parametrize(("name", "area"), [
    ("circle", math.pi * 20**2), ("square", 2 * 20**2), ("triangle", 3 * math.sqrt(3) / 4 * 20**2),
    ("star", _STAR_AREA), ("cross", _CROSS_AREA),
])
def test_rasterised_area_matches_geometry(name, area):
    _, _, mask = rasterize_shape(name, 64.0, 64.0, 20.0, 0.3, 128, 128)
    assert abs(mask.sum() - area) / area < 0.04


def _full_mask(name: str, angle: float) -> np.ndarray:
    out = np.zeros((128, 128), dtype=bool)
    row0, col0, mask = rasterize_shape(name, 64.0, 64.0, 30.0, angle, 128, 128)
    out[row0 : row0 + mask.shape[0], col0 : col0 + mask.shape[1]] = mask
    return out


def test_star_and_cross_are_non_convex():
    star, cross = _full_mask("star", 0.0), _full_mask("cross", 0.0)
    assert star[64, 64]
    assert star[64 - 28, 64]
    # Towards an inner vertex (36 degrees clockwise from up), 0.7 R out, is outside the star.
    assert not star[int(64 - 21 * math.cos(math.pi / 5)), int(64 + 21 * math.sin(math.pi / 5))]
    assert cross[64, 64]
    assert cross[64 - 28, 64]
    assert cross[64, 64 + 28]
    assert not cross[64 - 18, 64 + 18]  # between two arms


def _hand_scene() -> Scene:
    height = width = 64
    label = np.full((height, width), -1, dtype=np.int16)
    shapes = [("square", 32.0, 32.0, 20.0, 0.0), ("circle", 52.0, 32.0, 6.0, 0.0)]
    for i, (name, cx, cy, r, angle) in enumerate(shapes):
        row0, col0, mask = rasterize_shape(name, cx, cy, r, angle, height, width)
        label[row0 : row0 + mask.shape[0], col0 : col0 + mask.shape[1]][mask] = i
    vis = np.stack([label == i for i in range(2)])
    return Scene(
        image=np.zeros((height, width, 3), np.uint8), label_map=label,
        classes=np.array([SHAPE_CLASSES.index("square"), SHAPE_CLASSES.index("circle")]),
        colors=np.array([0, 1]), centers=np.array([[32.0, 32.0], [52.0, 32.0]]),
        radii=np.array([20.0, 6.0]), angles=np.zeros(2), full_areas=vis.sum((1, 2)),
        visible_areas=vis.sum((1, 2)), boxes=np.zeros((2, 4), np.float32),
        depths=np.array([6.0, 3.0], np.float32), background_depth=10.0,
    )


def test_keypoint_positions_and_visibility_from_occlusion():
    kps = _hand_scene().keypoints()
    assert kps.shape == (2, MAX_KEYPOINTS, 3)
    # Square with angle 0: corners at 12, 3, 6, 9 o'clock, then the centre.
    np.testing.assert_allclose(kps[0, :5, :2], [[32, 12], [52, 32], [32, 52], [12, 32],
                                                [32, 32]], atol=1e-9)
    # The circle painted on top hides the 3 o'clock corner only.
    assert kps[0, :, 2].tolist() == [2, 1, 2, 2, 2, 0]
    np.testing.assert_allclose(kps[1, :5, :2], [[52, 26], [58, 32], [52, 38], [46, 32],
                                                [52, 32]], atol=1e-9)
    assert kps[1, :, 2].tolist() == [2, 2, 2, 2, 2, 0]


def test_depth_follows_layer_order():
    scene = _hand_scene()
    depth = scene.depth_map()
    assert depth[0, 0] == 10.0
    assert depth[32, 32] == 6.0
    assert depth[32, 52] == 3.0
    rng = np.random.default_rng(0)
    for _ in range(20):
        s = sample_scene(rng)
        assert np.all(np.diff(s.depths) < 0)  # later-painted = nearer
        d = s.depth_map()
        assert np.all(d[s.label_map == -1] == s.background_depth)
        for i in range(s.num_shapes):
            assert np.all(d[s.label_map == i] == s.depths[i])


def test_palette_leaves_room_for_colour_jitter():
    values = np.array(list(COLORS.values()))
    # Shapes are painted with palette +- 12 straight into uint8, without clipping.
    assert values.min() >= 12
    assert values.max() <= 243


def test_scenes_respect_visibility_and_bounds():
    rng = np.random.default_rng(5)
    for _ in range(30):
        s = sample_scene(rng, height=96, width=80)
        assert 2 <= s.num_shapes <= 5
        assert np.all(s.visible_areas >= 0.5 * s.full_areas)
        assert np.array_equal(s.visible_areas, s.visible_masks().sum((1, 2)))
        assert np.all(s.boxes[:, 2] <= 80)
        assert np.all(s.boxes[:, 3] <= 96)
        assert s.image.shape == (96, 80, 3)


@pytest.mark.parametrize("kind", PROMPT_TYPES)
def test_visual_prompts_touch_their_object(kind):
    mask = np.zeros((64, 64), dtype=bool)
    mask[10:30, 20:50] = True
    prompt = visual_prompt(kind, mask, np.array([20, 10, 50, 30]), np.random.default_rng(0))
    assert prompt.dtype == bool
    assert prompt.any()
    assert (prompt & mask).any()
    if kind in ("box", "mask"):
        assert np.array_equal(prompt, mask)
    if kind == "point":
        assert prompt.sum() <= 9
    with pytest.raises(ValueError, match="unknown prompt type"):
        visual_prompt("lasso", mask, np.array([0, 0, 1, 1]), np.random.default_rng(0))


def test_dataloader_workers_match_sequential_loading():
    ds = ShapesDataset(num_samples=8, seed=2, image_size=48, task="det")
    loader = DataLoader(ds, batch_size=4, num_workers=2, collate_fn=collate)
    batches = list(loader)
    expected = collate([ds[i] for i in range(4, 8)])
    assert torch.equal(batches[1]["image"], expected["image"])
    assert all(torch.equal(a, b) for a, b in zip(batches[1]["boxes"], expected["boxes"]))
    assert batches[1]["image"].shape == (4, 3, 48, 48)
    assert isinstance(batches[1]["masks"], list)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="unknown task"):
        ShapesDataset(num_samples=4, task="segment")
    with pytest.raises(ValueError, match="num_samples"):
        ShapesDataset(num_samples=0)
    with pytest.raises(ValueError, match="image_size"):
        ShapesDataset(num_samples=4, image_size=8)
    with pytest.raises(ValueError, match="prompt_types"):
        ShapesDataset(num_samples=4, prompt_types=("lasso",))
    with pytest.raises(IndexError):
        ShapesDataset(num_samples=4)[4]
    with pytest.raises(ValueError, match="min_shapes"):
        sample_scene(np.random.default_rng(0), min_shapes=3, max_shapes=2)
    with pytest.raises(RuntimeError, match="could not place 12 shapes"):
        sample_scene(np.random.default_rng(0), height=16, width=16, min_shapes=12,
                     max_shapes=12, max_radius=0.4, min_radius=0.4, max_attempts=2)
