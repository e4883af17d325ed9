"""Procedurally generated images whose class evidence is known pixel-exactly (the generator;
:class:`zoo.data.synthetic.SyntheticDataModule` serves it as train/val/test splits).

Why this file is over 400 lines: the shapes, their placement and the rasteriser are one algorithm
whose pieces share the constants below; split, each part would be read only with the others.

Why: explanation quality (does a prototype / patch / part point at the right
thing?) can only be scored against ground truth, and real medical data has
none. Here every image carries exactly one small *evidence object* whose shape
sets the class; everything else (textured background, pixel noise, distractor
objects, colour) is independent of the label. The generator returns the
evidence mask and part keypoints, so localisation and EvalProtoPNet-style
consistency/stability metrics can be computed exactly. No files, no download.

Two modes:

* ``"evidence"``: one evidence shape per class (square, disc, triangle, cross,
  diamond, bar), keypoints = centre + top/bottom/left/right extreme pixels.
* ``"interaction"``: two part shapes A (triangle) and B (cross), each present
  with probability 1/2, label = A XOR B. No additive per-feature model can
  beat ~75 % here, so it separates models that capture interactions
  (e.g. Sum-of-Parts groups) from purely additive ones.

Generation is vectorised over samples: shapes are evaluated as inequalities on
pixel-coordinate grids (n, H, W), one shape type at a time.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F


MODES: tuple[str, ...] = ("evidence", "interaction")
EVIDENCE_SHAPES: tuple[str, ...] = ("square", "disc", "triangle", "cross", "diamond", "bar")
# Distractors come from a shape family disjoint from every class shape.
DISTRACTOR_SHAPES: tuple[str, ...] = ("ring", "line")
INTERACTION_PARTS: tuple[str, ...] = ("triangle", "cross")  # part A, part B
INTERACTION_CLASS_NAMES: list[str] = ["none_or_both", "exactly_one"]
EVIDENCE_KEYPOINTS: tuple[str, ...] = ("centre", "top", "bottom", "left", "right")
INTERACTION_KEYPOINTS: tuple[str, ...] = ("part_a", "part_b")

MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 16, 224
MAX_CLASSES = len(EVIDENCE_SHAPES)

# Object half-extent r = SCALE * side / 2, i.e. the object's bounding box spans
# 18-30 % of the image side; never below MIN_RADIUS px so that small images
# still render every shape recognisably (and the centre pixel is inside it).
SCALE_RANGE = (0.18, 0.30)
MIN_RADIUS = 2.5
# Object brightness above the local background. Positive only, so the object is
# always visible; its range exceeds the background's spread (BG_RANGE).
CONTRAST_RANGE = (0.35, 0.6)
BG_RANGE = (0.1, 0.4)
BG_GRID = 4  # the background texture is a bilinearly upsampled 4x4 random grid
GAP = 1.0  # min free pixels between the bounding boxes of two objects
CANDIDATES = 32  # random positions tried per object and round of placement
CHUNK = 1024  # samples rasterised at once (bounds memory at large image sizes)

ShapeFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


# ---------------------------------------------------------------------------
# Shapes: (dx, dy, r, sign) -> bool mask. dx/dy (n, H, W) are pixel offsets
# from the object centre, r (n, 1, 1) the half-extent in pixels, sign (n, 1, 1)
# a random +-1 only used by orientation-dependent distractors. Every shape lies
# inside the box |dx| <= r, |dy| <= r, which placement keeps disjoint.
# ---------------------------------------------------------------------------
def _square(dx, dy, r, s):
    return (dx.abs() <= 0.85 * r) & (dy.abs() <= 0.85 * r)


def _disc(dx, dy, r, s):
    return dx.square() + dy.square() <= r.square()


def _triangle(dx, dy, r, s):
    # Apex up at dy = -r, base at dy = +r with half-width r.
    return (dy <= r) & (dx.abs() <= (dy + r) / 2)


def _cross(dx, dy, r, s):
    arm = 0.3 * r
    return ((dx.abs() <= arm) & (dy.abs() <= r)) | ((dy.abs() <= arm) & (dx.abs() <= r))


def _diamond(dx, dy, r, s):
    return dx.abs() + dy.abs() <= r


def _bar(dx, dy, r, s):
    return (dx.abs() <= r) & (dy.abs() <= 0.45 * r)


def _ring(dx, dy, r, s):
    d2 = dx.square() + dy.square()
    return (d2 <= r.square()) & (d2 >= (0.5 * r).square())


def _line(dx, dy, r, s):
    # A thin diagonal stroke (about 1.5 px wide), "\" or "/" depending on s.
    return ((dx - s * dy).abs() <= 0.75) & (dx.abs() <= 0.8 * r) & (dy.abs() <= 0.8 * r)


SHAPES: dict[str, ShapeFn] = {
    "square": _square,
    "disc": _disc,
    "triangle": _triangle,
    "cross": _cross,
    "diamond": _diamond,
    "bar": _bar,
    "ring": _ring,
    "line": _line,
}


def class_names(mode: str = "evidence", num_classes: int = 4) -> list[str]:
    """Names of the classes of a synthetic configuration."""
    _check_mode(mode, num_classes)
    if mode == "interaction":
        return list(INTERACTION_CLASS_NAMES)
    return list(EVIDENCE_SHAPES[:num_classes])


def _check_mode(mode: str, num_classes: int) -> None:
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; available modes: {list(MODES)}")
    if mode == "interaction" and num_classes != 2:
        raise ValueError(f"num_classes must be 2 for mode='interaction', got {num_classes}")
    if mode == "evidence" and not 2 <= num_classes <= MAX_CLASSES:
        raise ValueError(f"num_classes must be in 2..{MAX_CLASSES} for mode='evidence', got {num_classes}")


def _check_args(
    image_size: int, channels: int, num_classes: int, mode: str, distractors: int, noise: float
) -> None:
    if not MIN_IMAGE_SIZE <= image_size <= MAX_IMAGE_SIZE:
        raise ValueError(f"image_size must be in [{MIN_IMAGE_SIZE}, {MAX_IMAGE_SIZE}], got {image_size}")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    _check_mode(mode, num_classes)
    if distractors < 0:
        raise ValueError(f"distractors must be >= 0, got {distractors}")
    if noise < 0:
        raise ValueError(f"noise must be >= 0, got {noise}")


# ---------------------------------------------------------------------------
# Sampling helpers (all draw from the caller's generator, never global RNG)
# ---------------------------------------------------------------------------
def _uniform(shape: tuple[int, ...], lo: float, hi: float, g: torch.Generator) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(shape, generator=g)


def _balanced(n: int, k: int, g: torch.Generator) -> torch.Tensor:
    """n labels in 0..k-1, as balanced as possible, in random order. (n,) long"""
    return (torch.arange(n) % k)[torch.randperm(n, generator=g)]


def _place(
    radius: torch.Tensor,
    active: torch.Tensor,
    size: int,
    g: torch.Generator,
    must_place: torch.Tensor,
    max_rounds: int = 100,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Place K objects per image with pairwise disjoint bounding boxes.

    radius (N, K) half-extents in px; active (N, K) objects wanted; must_place
    (K,) bool: objects that are retried until placed (the label-carrying ones;
    they come first), the others get one round of CANDIDATES tries and are
    dropped when no free spot was found. Returns centres (N, K, 2) as (x, y)
    and placed (N, K) bool. Boxes stay fully inside the image.
    """
    n, k = radius.shape
    centres = torch.zeros(n, k, 2)
    placed = torch.zeros(n, k, dtype=torch.bool)
    for j in range(k):
        pending = active[:, j].clone()
        rounds = max_rounds if bool(must_place[j]) else 1
        for _ in range(rounds):
            rows = pending.nonzero().squeeze(1)
            if len(rows) == 0:
                break
            r = radius[rows, j]  # (m,)
            span = (size - 1 - 2 * r).clamp_min(0.0)  # free range for the centre
            cand = r[:, None, None] + span[:, None, None] * torch.rand(len(rows), CANDIDATES, 2, generator=g)
            ok = torch.ones(len(rows), CANDIDATES, dtype=torch.bool)
            for i in range(j):  # clear of every object already placed
                need = (r + radius[rows, i] + GAP)[:, None]  # (m, 1)
                sep = (cand - centres[rows, i][:, None, :]).abs()  # (m, T, 2)
                clear = (sep[..., 0] > need) | (sep[..., 1] > need)
                ok &= clear | ~placed[rows, i][:, None]
            found = ok.any(1)
            first = ok.to(torch.uint8).argmax(1)  # first valid candidate
            hit = rows[found]
            centres[hit, j] = cand[found, first[found]]
            placed[hit, j] = True
            pending[hit] = False
        if bool(must_place[j]) and pending.any():
            raise RuntimeError("could not place a label-carrying object; image too small for its objects")
    return centres, placed


def _rasterise(
    shape_id: torch.Tensor,
    family: tuple[str, ...],
    centre: torch.Tensor,
    radius: torch.Tensor,
    sign: torch.Tensor,
    present: torch.Tensor,
    size: int,
) -> torch.Tensor:
    """Binary masks (n, H, W) of one object per image; empty where not present.

    shape_id (n,) indexes ``family``; centre (n, 2) as (x, y); radius, sign (n,).
    """
    n = len(shape_id)
    out = torch.zeros(n, size, size, dtype=torch.bool)
    coords = torch.arange(size, dtype=torch.float32)
    xs, ys = coords.view(1, 1, size), coords.view(1, size, 1)  # pixel (row y, col x)
    for s, name in enumerate(family):
        rows = ((shape_id == s) & present).nonzero().squeeze(1)
        if len(rows) == 0:
            continue
        dx = xs - centre[rows, 0].view(-1, 1, 1)  # (m, 1, W) -> broadcasts to (m, H, W)
        dy = ys - centre[rows, 1].view(-1, 1, 1)  # (m, H, 1)
        dx, dy = torch.broadcast_tensors(dx, dy)
        out[rows] = SHAPES[name](dx, dy, radius[rows].view(-1, 1, 1), sign[rows].view(-1, 1, 1))
    return out


def _extreme_keypoints(mask: torch.Tensor) -> torch.Tensor:
    """Top, bottom, left and right extreme points of non-empty masks.

    mask (n, H, W) bool -> (n, 4, 2) as (x, y). The top point is the mean
    column of the top-most mask row (a pixel, or between two adjacent mask
    pixels for even-width runs), so it always lies on the mask.
    """
    n, h, w = mask.shape
    ar = torch.arange(n)
    m = mask.float()
    rows_any, cols_any = mask.any(2), mask.any(1)  # (n, H), (n, W)
    top = rows_any.to(torch.uint8).argmax(1)
    bottom = h - 1 - rows_any.flip(1).to(torch.uint8).argmax(1)
    left = cols_any.to(torch.uint8).argmax(1)
    right = w - 1 - cols_any.flip(1).to(torch.uint8).argmax(1)
    col = torch.arange(w, dtype=torch.float32)
    row = torch.arange(h, dtype=torch.float32)

    def mean_pos(line: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        return (line * pos).sum(1) / line.sum(1).clamp_min(1.0)

    pts = [
        (mean_pos(m[ar, top], col), top.float()),
        (mean_pos(m[ar, bottom], col), bottom.float()),
        (left.float(), mean_pos(m[ar, :, left], row)),
        (right.float(), mean_pos(m[ar, :, right], row)),
    ]
    return torch.stack([torch.stack(p, dim=-1) for p in pts], dim=1)


def _background(n: int, channels: int, size: int, g: torch.Generator) -> torch.Tensor:
    """Smooth random texture in BG_RANGE, with a random per-image tint for RGB. (n, C, H, W)"""
    coarse = torch.rand(n, 1, BG_GRID, BG_GRID, generator=g)
    tex = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    lo = tex.amin(dim=(2, 3), keepdim=True)
    hi = tex.amax(dim=(2, 3), keepdim=True)
    tex = (tex - lo) / (hi - lo).clamp_min(1e-6)  # each image spans the full range
    # Channel weights in [0.5, 1]: the tint varies per image, independent of the label.
    tint = _uniform((n, channels, 1, 1), 0.5, 1.0, g) if channels == 3 else torch.ones(n, 1, 1, 1)
    return BG_RANGE[0] + (BG_RANGE[1] - BG_RANGE[0]) * tex * tint


def _object_colour(n: int, channels: int, g: torch.Generator) -> torch.Tensor:
    """Per-image additive colour of an object, (n, C): contrast x random hue (max channel 1)."""
    contrast = _uniform((n, 1), *CONTRAST_RANGE, g)
    if channels == 1:
        return contrast
    hue = _uniform((n, channels), 0.3, 1.0, g)
    return contrast * hue / hue.amax(1, keepdim=True)


# ---------------------------------------------------------------------------
# Public generator
# ---------------------------------------------------------------------------
def make_synthetic(
    n: int,
    image_size: int = 32,
    channels: int = 1,
    num_classes: int = 4,
    seed: int = 0,
    mode: str = "evidence",
    distractors: int = 2,
    noise: float = 0.1,
    return_layers: bool = False,
) -> dict[str, torch.Tensor]:
    """Generate ``n`` labelled images with ground-truth evidence masks.

    Returns a dict of tensors:
      images    (N, C, H, W) float in [0, 1]
      labels    (N,) long, class-balanced (exactly, up to n % num_classes)
      masks     (N, 1, H, W) float 0/1: the pixels of the label-carrying
                object(s) -- exactly the pixels drawing it changes
      keypoints (N, P, 3) float rows (x, y, visible) in pixel coordinates
                (x = column, y = row). evidence: P=5 (centre, top, bottom,
                left, right), all visible. interaction: P=2 (centre of part A,
                centre of part B), visible = part present (x = y = 0 if not).
    With ``return_layers=True`` also the additive layers the image is built
    from (all (N, C, H, W)): ``background``, ``distractor_layer``,
    ``evidence_layer``, ``noise_layer`` (images = clamp(sum, 0, 1)) and
    ``distractor_masks`` (N, 1, H, W).

    Same arguments -> identical tensors (a private torch.Generator is used).
    ``distractors`` objects per image are attempted; one is dropped in the rare
    case no free spot is found.
    """
    _check_args(image_size, channels, num_classes, mode, distractors, noise)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    g = torch.Generator().manual_seed(int(seed))
    size = image_size

    # --- label-carrying objects: K_e = 1 (evidence) or 2 (parts A, B) --------
    if mode == "evidence":
        labels = _balanced(n, num_classes, g)
        ev_shape = labels[:, None]  # (N, 1) index into EVIDENCE_SHAPES
        ev_present = torch.ones(n, 1, dtype=torch.bool)
        ev_family = EVIDENCE_SHAPES
    else:
        combo = _balanced(n, 4, g)  # the 4 presence patterns, balanced
        ev_present = torch.stack([combo % 2 == 1, combo // 2 == 1], dim=1)  # (N, 2)
        labels = (ev_present[:, 0] ^ ev_present[:, 1]).long()
        ev_shape = torch.arange(2).expand(n, 2)  # part A = 0, part B = 1
        ev_family = INTERACTION_PARTS
    k_e = ev_shape.shape[1]
    k = k_e + distractors

    # --- per-object parameters, (N, K) -----------------------------------------
    r_lo, r_hi = (max(s * size / 2, MIN_RADIUS) for s in SCALE_RANGE)
    radius = _uniform((n, k), r_lo, r_hi, g)
    sign = torch.randint(0, 2, (n, k), generator=g).float() * 2 - 1
    d_shape = torch.randint(0, len(DISTRACTOR_SHAPES), (n, distractors), generator=g)
    active = torch.cat([ev_present, torch.ones(n, distractors, dtype=torch.bool)], dim=1)
    must_place = torch.arange(k) < k_e
    centres, placed = _place(radius, active, size, g, must_place)
    colours = torch.stack([_object_colour(n, channels, g) for _ in range(k)], dim=1)  # (N, K, C)
    background = _background(n, channels, size, g)
    noise_layer = noise * torch.randn(n, channels, size, size, generator=g)

    # --- rasterise in chunks of samples ----------------------------------------
    ev_layer = torch.zeros(n, channels, size, size)
    dis_layer = torch.zeros(n, channels, size, size)
    ev_mask = torch.zeros(n, 1, size, size, dtype=torch.bool)
    dis_mask = torch.zeros(n, 1, size, size, dtype=torch.bool)
    for start in range(0, n, CHUNK):
        sl = slice(start, min(start + CHUNK, n))
        for j in range(k):
            is_ev = j < k_e
            m = _rasterise(
                ev_shape[sl, j] if is_ev else d_shape[sl, j - k_e],
                ev_family if is_ev else DISTRACTOR_SHAPES,
                centres[sl, j],
                radius[sl, j],
                sign[sl, j],
                placed[sl, j],
                size,
            )[:, None]  # (n_chunk, 1, H, W)
            paint = m.float() * colours[sl, j, :, None, None]  # (n_chunk, C, H, W)
            if is_ev:
                ev_layer[sl] += paint
                ev_mask[sl] |= m
            else:
                dis_layer[sl] += paint
                dis_mask[sl] |= m

    images = (background + dis_layer + ev_layer + noise_layer).clamp(0.0, 1.0)

    # --- keypoints ----------------------------------------------------------------
    if mode == "evidence":
        extremes = _extreme_keypoints(ev_mask[:, 0]) if n else torch.zeros(0, 4, 2)
        xy = torch.cat([centres[:, :1], extremes], dim=1)  # (N, 5, 2)
        keypoints = torch.cat([xy, torch.ones(n, 5, 1)], dim=2)
    else:
        vis = placed[:, :k_e].float()[..., None]  # (N, 2, 1)
        keypoints = torch.cat([centres[:, :k_e] * vis, vis], dim=2)  # (N, 2, 3)

    out = {
        "images": images,
        "labels": labels.long(),
        "masks": ev_mask.float(),
        "keypoints": keypoints.float(),
    }
    if return_layers:
        out.update(
            background=background,
            distractor_layer=dis_layer,
            evidence_layer=ev_layer,
            noise_layer=noise_layer,
            distractor_masks=dis_mask.float(),
        )
    return out


__all__ = [
    "MODES",
    "EVIDENCE_SHAPES",
    "DISTRACTOR_SHAPES",
    "INTERACTION_PARTS",
    "EVIDENCE_KEYPOINTS",
    "INTERACTION_KEYPOINTS",
    "class_names",
    "make_synthetic",
]
