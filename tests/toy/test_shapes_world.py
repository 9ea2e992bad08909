"""The procedural moving-shapes world: determinism, ranges, prompts, geometry, and the dataset CLI."""
from __future__ import annotations

import pytest
import torch

from tmd_train.data.format import LatentDataset, load_negative
from tmd_train.toy import clips as world
from tmd_train.toy import text_encoder
from tmd_train.toy.clips import ObjectSpec, WorldConfig


def test_clip_contract_and_determinism():
    cfg = WorldConfig(p_two=0.5)
    videos, prompts, labels = world.make_batch(12, seed=3, config=cfg)
    assert videos.shape == (12, 3, 8, 32, 32) and videos.dtype == torch.float32
    assert videos.min() >= -1 and videos.max() <= 1
    assert labels.shape == (12, 3) and labels.dtype == torch.long
    again, prompts2, _ = world.make_batch(12, seed=3, config=cfg)
    assert torch.equal(videos, again) and prompts == prompts2
    # prefix property and start offset
    tail, tail_prompts, _ = world.make_batch(4, seed=3, config=cfg, start=8)
    assert torch.equal(tail, videos[8:]) and tail_prompts == prompts[8:]
    other, _, _ = world.make_batch(12, seed=4, config=cfg)
    assert not torch.equal(other, videos)
    assert world.sample_prompts(12, seed=3, config=cfg) == prompts
    assert world.sample_prompts(4, seed=3, config=cfg, start=8) == prompts[8:]
    for p, lab in zip(prompts, labels, strict=True):
        first = world.parse_prompt(p)[0]
        assert list(first.labels) == lab.tolist()


def test_prompt_round_trip_and_two_objects():
    cfg = WorldConfig(p_two=0.5)
    n_two = 0
    for i in range(40):
        clip = world.make_clip(7, i, cfg)
        assert world.parse_prompt(clip.prompt) == clip.objects
        assert world.prompt_of(clip.objects) == clip.prompt
        if len(clip.objects) == 2:
            n_two += 1
            assert clip.objects[0].colour != clip.objects[1].colour
            assert " and a " in clip.prompt
    assert 8 < n_two < 32
    assert all(len(world.make_clip(7, i).objects) == 1 for i in range(20))
    assert world.make_clip(0, 0).prompt.split()[0] == "a"


@pytest.mark.parametrize("bad", ["a red circle moving", "a red circle moves left", "a red blob moving left",
                                 "a red circle moving left a blue ring moving up",
                                 "a red circle moving left and"])
def test_parse_errors(bad):
    with pytest.raises(ValueError):
        world.parse_prompt(bad)


def _object_mask(video: torch.Tensor, colour: str) -> torch.Tensor:
    """Pixels [F, H, W] close to ``colour`` (the background is dark, objects saturated)."""
    rgb = torch.tensor(world.COLOUR_RGB[colour])[:, None, None, None] * 2 - 1
    return (video - rgb).abs().amax(0) < 0.15


@pytest.mark.parametrize("direction", world.DIRECTIONS)
def test_motion_is_smooth_and_visible(direction):
    """The object's coverage-weighted centroid moves in the named direction at a constant speed, and the
    object is fully inside the frame in every frame."""
    cfg = WorldConfig()
    coords = torch.arange(cfg.size, dtype=torch.float64) + 0.5
    ys, xs = torch.meshgrid(coords, coords, indexing="ij")
    for shape in world.SHAPES:
        obj = ObjectSpec(shape, "yellow", direction)
        for i in range(4):
            alpha = world._object_layer(obj, world.clip_generator(11, i), cfg, xs[None], ys[None])
            area = alpha.sum((1, 2))
            # anti-aliased sampling makes the pixel area vary slightly with sub-pixel position
            assert (area - area[0]).abs().max() < 0.025 * area[0], "nothing is cut off at the border"
            edge = torch.cat([alpha[:, 0], alpha[:, -1], alpha[:, :, 0], alpha[:, :, -1]], dim=1)
            assert edge.max() == 0, "the object never touches the border"
            cx, cy = (alpha * xs).sum((1, 2)) / area, (alpha * ys).sum((1, 2)) / area
            dx, dy = world.DIRECTION_XY[direction]
            along, across = cx * dx + cy * dy, (cy if dx else cx)
            step = along[1:] - along[:-1]
            assert 1.15 <= step.min() and step.max() <= 2.1, "moves the named way at 1.25..2 px/frame"
            assert step.max() - step.min() < 0.2, "constant speed (up to the sampling of sharp corners)"
            assert (across - across[0]).abs().max() < 0.15, "no sideways drift"


def test_shapes_differ_in_geometry():
    """The bar fills its bounding box and is ~2.5 times as wide as tall; the circle fills ~pi/4 of its box;
    the ring has a hole: its centre pixel is background."""
    cfg = WorldConfig()
    fill, aspect, filled_centre = {}, {}, {}
    for shape in world.SHAPES:
        video = world.render([ObjectSpec(shape, "red", "right")], world.clip_generator(5, 0), cfg)
        mask = _object_mask(video, "red")[0]
        rows, cols = mask.any(1).nonzero(), mask.any(0).nonzero()
        box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
        fill[shape] = mask.sum().item() / box.item()
        aspect[shape] = (cols.max() - cols.min() + 1).item() / (rows.max() - rows.min() + 1).item()
        centre = (rows.min() + (rows.max() - rows.min()) // 2, cols.min() + (cols.max() - cols.min()) // 2)
        filled_centre[shape] = bool(mask[centre])
    assert fill["bar"] > 0.85 and aspect["bar"] > 2.0
    assert 0.65 < fill["circle"] < 0.85 and 0.8 < aspect["circle"] < 1.25 and filled_centre["circle"]
    assert fill["ring"] < 0.65 and 0.8 < aspect["ring"] < 1.25 and not filled_centre["ring"]


def test_first_object_is_painted_on_top():
    """Where two objects overlap, the first object of the prompt is visible."""
    cfg = WorldConfig()
    coords = torch.arange(cfg.size, dtype=torch.float64) + 0.5
    ys, xs = torch.meshgrid(coords, coords, indexing="ij")
    first, second = ObjectSpec("bar", "yellow", "left"), ObjectSpec("bar", "blue", "right")
    overlaps = 0
    for i in range(30):
        g = world.clip_generator(21, i)
        a = world._object_layer(first, g, cfg, xs[None], ys[None])
        b = world._object_layer(second, g, cfg, xs[None], ys[None])
        both = (a == 1) & (b == 1)
        if not both.any():
            continue
        overlaps += 1
        video = world.render([first, second], world.clip_generator(21, i), cfg)
        assert _object_mask(video, "yellow")[both].all() and not _object_mask(video, "blue")[both].any()
    assert overlaps >= 3


def test_background_is_dark_and_static():
    video = world.render([ObjectSpec("circle", "blue", "up")], world.clip_generator(1, 2))
    mask = _object_mask(video, "blue").any(0).float()
    near = torch.nn.functional.max_pool2d(mask[None, None], 5, stride=1, padding=2)[0, 0] > 0
    assert 0.05 < near.float().mean() < 0.6
    bg = video[:, :, ~near]
    assert bg.max() < -0.4, "dark background"
    assert torch.equal(bg[:, 0], bg[:, -1]), "static background away from the object"
    assert bg[:, 0].std() > 0.01, "the background has texture"


def test_config_validation():
    with pytest.raises(ValueError, match="p_two"):
        WorldConfig(p_two=1.5)
    with pytest.raises(ValueError, match="spans"):
        WorldConfig(speed=(2.0, 2.5))
    with pytest.raises(ValueError, match="colour"):
        ObjectSpec("circle", "purple", "left")
    with pytest.raises(ValueError, match=">= 0"):
        world.clip_generator(-1, 0)


def test_render_prompts_matches_attributes():
    prompts = ["a green bar moving down", "a red ring moving left and a blue circle moving up"]
    videos = world.render_prompts(prompts, seed=9)
    assert videos.shape == (2, 3, 8, 32, 32)
    assert _object_mask(videos[0], "green").sum() > 100
    assert _object_mask(videos[1], "red").sum() > 50 and _object_mask(videos[1], "blue").sum() > 50
    assert torch.equal(videos, world.render_prompts(prompts, seed=9))


def test_cli_writes_a_dataset(tmp_path):
    out = tmp_path / "toy"
    world.main(["--out", str(out), "--n", "10", "--seed", "5", "--p-two", "0.3", "--shard-size", "4"])
    ds = LatentDataset(out)
    assert len(ds) == 10 and ds.metadata["seed"] == 5 and ds.metadata["world"]["p_two"] == 0.3
    assert ds.shapes["latents"] == (3, 8, 32, 32)
    assert ds.shapes["text_emb"] == (text_encoder.L_TEXT, text_encoder.TEXT_DIM)
    videos, prompts, _ = world.make_batch(10, 5, WorldConfig(p_two=0.3))
    assert ds.prompts == prompts
    item = ds[6]
    assert item["latents"].dtype == torch.bfloat16
    torch.testing.assert_close(item["latents"].float(), videos[6], atol=8e-3, rtol=0)
    emb, mask = text_encoder.encode(prompts[6])
    torch.testing.assert_close(item["text_emb"].float(), emb, atol=2e-2, rtol=1e-2)
    assert torch.equal(item["text_mask"], mask)
    neg_emb, neg_mask = load_negative(out)
    assert torch.all(neg_emb == 0) and not neg_mask.any()
