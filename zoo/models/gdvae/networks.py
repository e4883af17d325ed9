"""GdVAE's networks: the two-block encoder q(z|x) and the two decoders p(x|z, y).

* :class:`Encoder` — the zoo's small CNN → mean and log-variance (B,D) each; class dims from the
  pooled map (a plain average, or a learned attention whose centroid gives the two *where* dims),
  style dims from a 4×4-pooled map.
* :class:`Decoder` — [z, y] → a coarse grid → (upsample ×2, 3×3 conv) per stage → tanh image
  (optionally FiLM-modulated by the class vector at every stage).
* :class:`ObjectDecoder` — Dec(z, y) = tanh(B(z_style) + place(G(z, y), z_where)): a background
  decoder that sees the style dims only, plus a class glyph pasted by a spatial transformer.

The model that uses them, and why each is built this way: model.py.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zoo.nets.backbones import build_backbone

WHERE_DIMS = 2  # object-centric layout: the glyph centre (x, y), right after the class dims


class Encoder(nn.Module):
    """The zoo's small CNN (two 3×3 conv-BN-ReLU per stage, 2×2 max-pool between stages) → mean and
    log-variance of q(z|x), split in two blocks:

    * class dims ``z[:, :class_dims]`` from the global average pool: position-free evidence, exactly
      what the black-box baseline's head sees (a small object anywhere in the image);
    * style dims ``z[:, class_dims:]`` from the flattened 4×4-pooled map: *where* things are and the
      background, needed to reconstruct.

    Why split (measured on synthetic, cross-entropy only, 2 epochs): one linear head over [flattened
    map, pool] reached 0.52 train accuracy, the pooled part alone 0.98 — Adam moves each of the 2048
    flattened-map weights as fast as the 128 pooled ones, and that noise swamps the class evidence.
    BatchNorm trains this trunk far faster than GroupNorm/no norm here; its running statistics are
    recomputed after training (GdVAE.on_train_end) and decoded counterfactuals are re-encoded with
    running statistics in training (see GdVAE._consistency)."""

    def __init__(self, in_channels: int, image_size: int, widths: Sequence[int], latent_dim: int,
                 class_dims: int, object_centric: bool = False) -> None:
        super().__init__()
        self.features = build_backbone("zoo_cnn", in_channels, widths=widths)
        self.pool = nn.AdaptiveAvgPool2d(4)  # fixed 4×4 grid whatever the input size
        c = self.features.out_channels
        self.class_head = nn.Linear(c, 2 * class_dims)
        # Object-centric: the class dims pool the map with a learned attention (softmax over positions)
        # instead of uniformly, and the attention's centroid is the two "where" dims (see ObjectDecoder).
        self.attention = nn.Conv2d(c, 1, 1) if object_centric else None
        where = WHERE_DIMS if object_centric else 0
        style_dims = latent_dim - class_dims - where
        if style_dims < 0:
            raise ValueError(f"gdvae: latent_dim={latent_dim} leaves no room for {class_dims} class dims "
                             f"and {where} where dims")
        # The glyph position is near-deterministic: log-variance −6 is a std of 0.05 (< 1 px at 32 px).
        self.where_logvar = nn.Parameter(torch.full((where,), -6.0)) if where else None
        self.style_head = nn.Linear(c * 16, 2 * style_dims) if style_dims else None

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:  # (B,C,H,W) -> (B,D), (B,D)
        h = self.features(x)  # (B,c,h,w)
        if self.attention is None:
            pooled = h.mean(dim=(2, 3))  # (B,c)
        else:
            hh, ww = h.shape[-2:]
            attn = self.attention(h).flatten(1).softmax(1)  # (B,h·w)
            pooled = torch.einsum("bn,bcn->bc", attn, h.flatten(2))
            rows, cols = torch.meshgrid(_cell_centres(hh, h), _cell_centres(ww, h), indexing="ij")
            where = torch.stack([attn @ cols.flatten(), attn @ rows.flatten()], 1)  # (B,2) centroid (x, y)
        mean, logvar = self.class_head(pooled).chunk(2, dim=1)
        if self.attention is not None:
            mean = torch.cat([mean, where], 1)
            logvar = torch.cat([logvar, self.where_logvar.expand(mean.shape[0], -1)], 1)
        if self.style_head is not None:
            mean_s, logvar_s = self.style_head(self.pool(h).flatten(1)).chunk(2, dim=1)
            mean, logvar = torch.cat([mean, mean_s], 1), torch.cat([logvar, logvar_s], 1)
        return mean, logvar.clamp(-10, 6)  # clamp: exp() stays finite early in training


def _cell_centres(n: int, like: Tensor) -> Tensor:
    """Centres of n equal cells of [-1, 1] (grid_sample's align_corners=False convention)."""
    return (torch.arange(n, device=like.device, dtype=like.dtype) + 0.5) * (2 / n) - 1


class Decoder(nn.Module):
    """[z, y] → a (width, s0, s0) grid → (upsample ×2, 3×3 conv) per stage → tanh image in [-1, 1].
    s0 = ceil(image_size / 2^stages); a final resize handles sizes that are not a power-of-two
    multiple (28 px: 4 → 32 → 28)."""

    def __init__(self, out_channels: int, image_size: int, widths: Sequence[int], latent_dim: int,
                 num_classes: int, film: bool = False) -> None:
        super().__init__()
        widths = list(widths)[::-1]  # deepest first
        self.image_size, self.width0 = image_size, widths[0]
        self.s0 = math.ceil(image_size / 2 ** len(widths))
        self.fc = nn.Linear(latent_dim + num_classes, widths[0] * self.s0 * self.s0)
        layers, c = [], widths[0]
        for w in widths[1:] + [widths[-1]]:
            layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(c, w, 3, padding=1), nn.SiLU()]
            c = w
        self.body = nn.Sequential(*layers)
        self.out = nn.Conv2d(c, out_channels, 3, padding=1)
        # Optional FiLM: the class vector also scales/shifts every stage's channels (zero-init: starts as
        # the plain decoder), so a class change can redraw features at every resolution.
        self.film = nn.ModuleList(nn.Linear(num_classes, 2 * m.out_channels) for m in layers
                                  if isinstance(m, nn.Conv2d)) if film else None
        if self.film is not None:
            for lin in self.film:
                nn.init.zeros_(lin.weight)
                nn.init.zeros_(lin.bias)

    def forward(self, z: Tensor, y: Tensor, activation: bool = True) -> Tensor:
        """(B,D), (B,K) class vector -> (B,C,H,W) image (tanh), or its pre-activation."""
        h = F.silu(self.fc(torch.cat([z, y], dim=1))).view(-1, self.width0, self.s0, self.s0)
        if self.film is None:
            h = self.body(h)
        else:
            films = iter(self.film)
            for layer in self.body:
                h = layer(h)
                if isinstance(layer, nn.Conv2d):
                    gamma, beta = next(films)(y)[:, :, None, None].chunk(2, dim=1)
                    h = h * (1 + gamma) + beta
        h = self.out(h)
        if h.shape[-1] != self.image_size:
            h = F.interpolate(h, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        return torch.tanh(h) if activation else h


class ObjectDecoder(nn.Module):
    """Dec(z, y) = tanh(B(z_style) + place(G(z, y), z_where)): a background decoder B that sees the style
    dims only, plus an object *glyph* G (a small canvas drawn from z and the class vector) pasted at the
    two "where" dims by a spatial transformer (affine_grid / grid_sample, zero outside the window).

    Why: with one decoder the class vector and class dims reach every pixel, and a counterfactual redraws
    the whole image (measured with the plain decoder: 8 % of the change inside the evidence mask). Here
    the class can only change pixels inside the glyph window, which the encoder's class attention puts
    on the evidence. The glyph spans ``glyph_fraction`` of the image side."""

    def __init__(self, out_channels: int, image_size: int, widths: Sequence[int], latent_dim: int,
                 num_classes: int, class_dims: int, film: bool = False, glyph_fraction: float = 0.5,
                 glyph_px: int = 16) -> None:
        super().__init__()
        self.class_dims, self.fraction = class_dims, float(glyph_fraction)
        style_dims = latent_dim - class_dims - WHERE_DIMS
        self.background = Decoder(out_channels, image_size, widths, style_dims, 0)
        self.glyph = Decoder(out_channels, glyph_px, widths, latent_dim, num_classes, film=film)

    def forward(self, z: Tensor, y: Tensor) -> Tensor:  # (B,D), (B,K) -> (B,C,H,W)
        where = z[:, self.class_dims:self.class_dims + WHERE_DIMS]  # (B,2) glyph centre (x, y) in [-1, 1]
        background = self.background(z[:, self.class_dims + WHERE_DIMS:], z.new_zeros(z.shape[0], 0), False)
        glyph = self.glyph(z, y, activation=False)  # (B,C,g,g)
        # Output pixel p samples the glyph at (p − where) / fraction: the glyph's centre lands on `where`.
        theta = z.new_zeros(z.shape[0], 2, 3)
        theta[:, 0, 0] = theta[:, 1, 1] = 1 / self.fraction
        theta[:, :, 2] = -where / self.fraction
        grid = F.affine_grid(theta, list(background.shape), align_corners=False)
        placed = F.grid_sample(glyph, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        return torch.tanh(background + placed)
