"""The procedural "moving shapes" video world: the embedded default's data (docs/design.md §4.5).

A clip is ``[3, F, H, W]`` RGB in ``[-1, 1]`` (float32), by default ``F = 8`` frames of ``32 × 32``
pixels — small enough that a tiny teacher trains on a CPU. It shows one object (or, with
probability ``p_two``, two) moving in a straight line at a constant speed over a dark background:

* shape ∈ {circle, bar, ring}, colour ∈ {red, green, blue, yellow},
  direction ∈ {left, right, up, down} (image coordinates: "up" is towards row 0);
* size ``r ~ U[4, 6]`` px: a circle is a disc of radius ``r``; a bar a horizontal rectangle of half-sides
  ``1.15·r × 0.45·r``; a ring an annulus of radii ``0.53·r … 1.17·r``. The three differ at low spatial
  frequency (a bar's aspect, a ring's hole of 4–6 px), which a 4×4-pixel patch token sees; an earlier
  circle / square / triangle world differed only at the corners, and a ~2 M-parameter teacher never
  learnt to draw the shape its prompt named. Speed ``~ U[1.25, 2]`` px/frame, fixed per object; the start is drawn so
  the whole object stays inside the frame, at least 1 px from the border, for the whole clip;
* background: a dark colour (each channel ``U[0.02, 0.18]`` in [0, 1] units) plus a linear
  gradient (random direction, amplitude ``U[0, 0.12]``) plus static per-pixel noise (std 0.03);
* shapes are anti-aliased (coverage ``clamp(0.5 - sdf, 0, 1)`` at pixel centres); with two objects
  the first object (the first phrase of the prompt) is painted on top, and the two have different colours.

Prompts: ``"a red circle moving left"`` or ``"a red circle moving left and a blue ring moving up"``.
Everything is deterministic: clip ``i`` of seed ``s`` draws from a CPU ``torch.Generator`` seeded by
``numpy.random.SeedSequence([s, i])``, so ``make_batch(n, s)`` is a prefix of ``make_batch(n + k, s)``.

The toy world has **no VAE**: the teacher works in pixel space (``in_channels = 3``) and a dataset
written by ``python -m tmd_train.toy.clips --out DIR --n N`` stores the clips themselves as
``latents [n, 3, 8, 32, 32]``, with text from :mod:`tmd_train.toy.text_encoder`.
"""
from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ..data.format import INDEX_FILE, DatasetWriter
from ..errors import ArgumentParser, OutputError, check_output_dir, run_main
from . import text_encoder

SHAPES: tuple[str, ...] = ("circle", "bar", "ring")
COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow")
DIRECTIONS: tuple[str, ...] = ("left", "right", "up", "down")
ATTRIBUTES: tuple[tuple[str, ...], ...] = (SHAPES, COLOURS, DIRECTIONS)
ATTRIBUTE_NAMES: tuple[str, ...] = ("shape", "colour", "direction")

#: RGB in [0, 1].
COLOUR_RGB: dict[str, tuple[float, float, float]] = {
    "red": (0.92, 0.16, 0.14),
    "green": (0.16, 0.82, 0.22),
    "blue": (0.20, 0.38, 0.96),
    "yellow": (0.95, 0.88, 0.14),
}
#: Unit motion (dx, dy) in image coordinates (x = column, y = row, row 0 at the top).
DIRECTION_XY: dict[str, tuple[int, int]] = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
#: Half-extent of each shape in units of r (the ring's outer radius is 1.17 r, the bar's half-width 1.15 r).
EXTENT = 1.2
#: The bar's half-width and half-height in units of r.
BAR_HALF = (1.15, 0.45)
#: The ring's mid-line radius and half-thickness in units of r (radii 0.53 r … 1.17 r).
RING_RADIUS = 0.85
RING_HALF_WIDTH = 0.32
#: Minimum gap in px between an object's extent and the frame border (anti-aliasing reaches 0.5 px out).
MARGIN = 1.0


@dataclass(frozen=True)
class ObjectSpec:
    """One object's attributes."""

    shape: str
    colour: str
    direction: str

    def __post_init__(self) -> None:
        for value, allowed, name in zip((self.shape, self.colour, self.direction), ATTRIBUTES, ATTRIBUTE_NAMES,
                                        strict=True):
            if value not in allowed:
                raise ValueError(f"ObjectSpec: {name} must be one of {allowed}, got {value!r}")

    @property
    def phrase(self) -> str:
        """``"a <colour> <shape> moving <direction>"``."""
        return f"a {self.colour} {self.shape} moving {self.direction}"

    @property
    def labels(self) -> tuple[int, int, int]:
        """``(shape index, colour index, direction index)`` into :data:`ATTRIBUTES`."""
        return SHAPES.index(self.shape), COLOURS.index(self.colour), DIRECTIONS.index(self.direction)


@dataclass(frozen=True)
class WorldConfig:
    """Settings of the world (defaults: the embedded toy default)."""

    frames: int = 8
    size: int = 32
    p_two: float = 0.0
    radius: tuple[float, float] = (4.0, 6.0)
    speed: tuple[float, float] = (1.25, 2.0)
    noise_std: float = 0.03

    def __post_init__(self) -> None:
        if self.frames < 2 or self.size < 8:
            raise ValueError(f"WorldConfig: need frames >= 2 and size >= 8, got {self.frames}, {self.size}")
        if not 0.0 <= self.p_two <= 1.0:
            raise ValueError(f"WorldConfig: p_two must be in [0, 1], got {self.p_two}")
        if not (0 < self.radius[0] <= self.radius[1] and 0 < self.speed[0] <= self.speed[1]):
            raise ValueError(f"WorldConfig: bad radius {self.radius} or speed {self.speed} range")
        need = 2 * (EXTENT * self.radius[1] + MARGIN) + self.speed[1] * (self.frames - 1)
        if need > self.size:
            raise ValueError(f"WorldConfig: the largest, fastest object spans {need:.1f} px over the clip, "
                             f"more than size={self.size}")
        if self.noise_std < 0:
            raise ValueError(f"WorldConfig: noise_std must be >= 0, got {self.noise_std}")


@dataclass(frozen=True)
class Clip:
    """A clip: ``video [3, F, H, W]`` float32 in [-1, 1], its prompt, its objects, and
    ``labels [3]`` (long) of the first object."""

    video: torch.Tensor
    prompt: str
    objects: tuple[ObjectSpec, ...]
    labels: torch.Tensor


def prompt_of(objects: Sequence[ObjectSpec]) -> str:
    """The prompt of a list of objects, phrases joined by ``" and "``."""
    if not objects:
        raise ValueError("prompt_of: need at least one object")
    return " and ".join(o.phrase for o in objects)


def parse_prompt(prompt: str) -> tuple[ObjectSpec, ...]:
    """Inverse of :func:`prompt_of`; raises ``ValueError`` for anything else."""
    words = prompt.lower().split()
    objects = []
    pos = 0
    while True:
        chunk = words[pos:pos + 5]
        if len(chunk) != 5 or chunk[0] != "a" or chunk[3] != "moving":
            raise ValueError(f"parse_prompt: {prompt!r} is not 'a <colour> <shape> moving <direction>' "
                             f"[' and ' ...]")
        objects.append(ObjectSpec(shape=chunk[2], colour=chunk[1], direction=chunk[4]))
        pos += 5
        if pos == len(words):
            return tuple(objects)
        if words[pos] != "and":
            raise ValueError(f"parse_prompt: expected 'and' after an object phrase in {prompt!r}")
        pos += 1


def clip_generator(seed: int, index: int) -> torch.Generator:
    """The CPU generator of clip ``index`` of world seed ``seed`` (both ints >= 0)."""
    if seed < 0 or index < 0:
        raise ValueError(f"clip_generator: seed and index must be >= 0, got {seed}, {index}")
    state = np.random.SeedSequence([int(seed), int(index)]).generate_state(2, dtype=np.uint32)
    return torch.Generator(device="cpu").manual_seed(int(state[0]) << 31 | int(state[1]) >> 1)


def _uniform(g: torch.Generator, lo: float = 0.0, hi: float = 1.0) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=g, dtype=torch.float64))


def _choice(g: torch.Generator, n: int) -> int:
    return int(torch.randint(n, (), generator=g))


def sample_objects(g: torch.Generator, config: WorldConfig) -> tuple[ObjectSpec, ...]:
    """Draw one object (or two with probability ``p_two``; the second has a different colour)."""
    two = _uniform(g) < config.p_two
    first = ObjectSpec(SHAPES[_choice(g, 3)], COLOURS[_choice(g, 4)], DIRECTIONS[_choice(g, 4)])
    if not two:
        return (first,)
    others = [c for c in COLOURS if c != first.colour]
    second = ObjectSpec(SHAPES[_choice(g, 3)], others[_choice(g, 3)], DIRECTIONS[_choice(g, 4)])
    return first, second


def _object_layer(obj: ObjectSpec, g: torch.Generator, config: WorldConfig, xx: torch.Tensor,
                  yy: torch.Tensor) -> torch.Tensor:
    """Coverage ``[F, H, W]`` in [0, 1] of one moving object, drawing its size, speed and start from ``g``."""
    r = _uniform(g, *config.radius)
    speed = _uniform(g, *config.speed)
    e = EXTENT * r + MARGIN
    travel = speed * (config.frames - 1)
    dx, dy = DIRECTION_XY[obj.direction]
    # Start along the motion axis so the centre stays in [e, size - e] (e = extent + margin) in all frames.
    along = _uniform(g, e, config.size - e - travel)
    across = _uniform(g, e, config.size - e)
    if dx != 0:
        cx0, cy0 = (along if dx > 0 else config.size - along), across
    else:
        cx0, cy0 = across, (along if dy > 0 else config.size - along)
    f = torch.arange(config.frames, dtype=torch.float64)[:, None, None]
    px = xx - (cx0 + dx * speed * f)
    py = yy - (cy0 + dy * speed * f)
    if obj.shape == "circle":
        sdf = torch.hypot(px, py) - r
    elif obj.shape == "bar":
        sdf = torch.maximum(px.abs() - BAR_HALF[0] * r, py.abs() - BAR_HALF[1] * r)
    else:  # ring
        sdf = (torch.hypot(px, py) - RING_RADIUS * r).abs() - RING_HALF_WIDTH * r
    return (0.5 - sdf).clamp(0.0, 1.0)


def _background(g: torch.Generator, config: WorldConfig, xx: torch.Tensor, yy: torch.Tensor) -> torch.Tensor:
    """Static background ``[3, 1, H, W]`` in [0, 1]."""
    base = torch.tensor([_uniform(g, 0.02, 0.18) for _ in range(3)], dtype=torch.float64)
    angle = _uniform(g, 0.0, 2 * math.pi)
    amp = _uniform(g, 0.0, 0.12)
    ramp = ((xx[0] - config.size / 2) * math.cos(angle) + (yy[0] - config.size / 2) * math.sin(angle)) / config.size
    noise = torch.randn(3, config.size, config.size, generator=g, dtype=torch.float64) * config.noise_std
    bg = base[:, None, None] + amp * ramp[None] + noise
    return bg.clamp(0.0, 1.0)[:, None]


def render(objects: Sequence[ObjectSpec], g: torch.Generator, config: WorldConfig | None = None) -> torch.Tensor:
    """Render ``objects`` with nuisance factors (size, speed, start, background) drawn from ``g``.

    Returns ``[3, F, H, W]`` float32 in [-1, 1].
    """
    config = config or WorldConfig()
    if not objects:
        raise ValueError("render: need at least one object")
    coords = torch.arange(config.size, dtype=torch.float64) + 0.5
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    xx, yy = xx[None], yy[None]
    layers = [_object_layer(o, g, config, xx, yy) for o in objects]
    video = _background(g, config, xx, yy).expand(3, config.frames, config.size, config.size)
    for obj, alpha in reversed(list(zip(objects, layers, strict=True))):
        rgb = torch.tensor(COLOUR_RGB[obj.colour], dtype=torch.float64)[:, None, None, None]
        video = video * (1 - alpha) + rgb * alpha
    return (video * 2 - 1).to(torch.float32)


def make_clip(seed: int, index: int, config: WorldConfig | None = None) -> Clip:
    """Clip ``index`` of world seed ``seed``: random objects, then their rendering."""
    config = config or WorldConfig()
    g = clip_generator(seed, index)
    objects = sample_objects(g, config)
    video = render(objects, g, config)
    return Clip(video, prompt_of(objects), objects, torch.tensor(objects[0].labels, dtype=torch.long))


def make_batch(n: int, seed: int, config: WorldConfig | None = None,
               start: int = 0) -> tuple[torch.Tensor, list[str], torch.Tensor]:
    """Clips ``start .. start+n-1`` of seed ``seed``: ``(videos [n, 3, F, H, W], prompts, labels [n, 3])``."""
    clips = [make_clip(seed, start + i, config) for i in range(n)]
    return (torch.stack([c.video for c in clips]), [c.prompt for c in clips],
            torch.stack([c.labels for c in clips]))


def sample_prompts(n: int, seed: int, config: WorldConfig | None = None, start: int = 0) -> list[str]:
    """The prompts of clips ``start .. start+n-1`` of seed ``seed`` (as :func:`make_batch`, without rendering)."""
    config = config or WorldConfig()
    return [prompt_of(sample_objects(clip_generator(seed, start + i), config)) for i in range(n)]


def render_prompts(prompts: Sequence[str], seed: int, config: WorldConfig | None = None) -> torch.Tensor:
    """Real clips for given prompts ``[n, 3, F, H, W]``: clip ``i`` renders ``parse_prompt(prompts[i])``
    with nuisance factors from ``clip_generator(seed, i)``."""
    config = config or WorldConfig()
    return torch.stack([render(parse_prompt(p), clip_generator(seed, i), config) for i, p in enumerate(prompts)])


def write_dataset(out: str, n: int, seed: int = 0, config: WorldConfig | None = None, shard_size: int = 256,
                  dtype: torch.dtype = torch.bfloat16, overwrite: bool = False, chunk: int = 64) -> None:
    """Write ``n`` clips of seed ``seed`` as a ``"latents"`` dataset (pixel space, see module doc)."""
    config = config or WorldConfig()
    meta = {"source": "tmd_train.toy.clips", "space": "pixel (no VAE; latents are the clips in [-1, 1])",
            "seed": seed, "world": asdict(config),
            "text_encoder": {"name": "tmd_train.toy.text_encoder", "table_seed": text_encoder.TABLE_SEED,
                             "L_text": text_encoder.L_TEXT, "text_dim": text_encoder.TEXT_DIM}}
    with DatasetWriter(out, kind="latents", shard_size=shard_size, dtype=dtype, metadata=meta,
                       overwrite=overwrite) as w:
        w.set_negative(*text_encoder.encode_negative())
        for s in range(0, n, chunk):
            videos, prompts, _ = make_batch(min(chunk, n - s), seed, config, start=s)
            emb, mask = text_encoder.encode(prompts)
            w.add_batch(prompts, latents=videos, text_emb=emb, text_mask=mask)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: ``python -m tmd_train.toy.clips --out DIR --n N [--seed S] [--p-two P] [--overwrite]``.

    ``--overwrite`` replaces an earlier dataset folder only once the new one is complete; a file, or a
    non-empty folder that is not a dataset, is never replaced. User errors raise
    :class:`~tmd_train.errors.UserError` before anything is written."""
    ap = ArgumentParser(prog="python -m tmd_train.toy.clips", description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="dataset folder to create")
    ap.add_argument("--n", type=int, required=True, help="number of clips")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--p-two", type=float, default=0.0, help="probability of a two-object clip")
    ap.add_argument("--shard-size", type=int, default=256)
    ap.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    ap.add_argument("--overwrite", action="store_true", help="replace an earlier dataset in --out (once the new one "
                                                             "is complete)")
    ap.add_argument("--debug", action="store_true", help="show the traceback of user errors too")
    args = ap.parse_args(argv)
    if args.n < 1:
        ap.error(f"--n must be >= 1, got {args.n}")
    if args.shard_size < 1:
        ap.error(f"--shard-size must be >= 1, got {args.shard_size}")
    try:
        world = WorldConfig(p_two=args.p_two)
    except ValueError as e:
        ap.error(f"--p-two: {e}")
    out = Path(args.out)
    check_output_dir(out, "--out")
    if out.exists():
        if not args.overwrite:
            raise OutputError(f"--out {out} already exists; pass --overwrite to replace it (only once the new "
                              "dataset is complete) or choose another --out")
        if any(out.iterdir()) and not (out / INDEX_FILE).is_file():
            raise OutputError(f"--out {out} is a non-empty folder but not a dataset (no {INDEX_FILE}); it is not "
                              "replaced: remove it or choose another --out")
    write_dataset(args.out, args.n, seed=args.seed, config=world, shard_size=args.shard_size,
                  dtype=getattr(torch, args.dtype), overwrite=args.overwrite)
    print(f"wrote {args.n} clips to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
