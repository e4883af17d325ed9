"""The prototype similarity layer: distances between feature-map cells and prototypes, and the
similarity they give (ProtoPNet, Chen et al., "This looks like that", NeurIPS 2019).

For features z (B,D,h,w) and prototypes p (P,D):

    log-L2 (the paper):  d_j(z_hw) = ‖z_hw − p_j‖²             s = log((d + 1) / (d + ε)),  ε = 1e-4
    cosine (ProtoFM):    d_j(z_hw) = 1 − cos(z_hw, p_j) ∈ [0, 2]   s = cos = 1 − d

both (B,P,h,w). ‖z − p‖² is computed as ‖z‖² − 2⟨z,p⟩ + ‖p‖² in one batched matmul (no (B,P,D,h,w)
tensor), clamped at 0 against round-off. Deviation, with its reason: distances and similarities are
always computed in float32, even under autocast — in fp16/bf16 a near-match's distance is the small
difference of two large terms, and log((d+1)/(d+ε)) of a wrong near-zero d is off by orders of
magnitude.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

SIMILARITIES = ("log_l2", "cosine")
LOG_EPS = 1e-4  # ProtoPNet's ε in log((d+1)/(d+ε)): the similarity of an exact match is log(1e4) ≈ 9.2


def _fp32(fn):
    """Run a distance in float32 even under autocast: ‖z‖² + ‖p‖² − 2⟨z,p⟩ cancels catastrophically in
    fp16/bf16 (a near-match's distance is the small difference of two large terms), and the log-L2
    similarity log((d+1)/(d+ε)) of a wrong near-zero d is off by orders of magnitude."""

    def wrapped(z: Tensor, prototypes: Tensor) -> Tensor:
        with torch.autocast(device_type=z.device.type, enabled=False):
            return fn(z.float(), prototypes.float())

    wrapped.__doc__, wrapped.__name__ = fn.__doc__, fn.__name__
    return wrapped


@_fp32
def l2_distances(z: Tensor, prototypes: Tensor) -> Tensor:
    """‖z_hw − p_j‖² for every location and prototype, via ‖z‖² − 2⟨z,p⟩ + ‖p‖² (one matmul), in fp32.

    z (B,D,h,w), prototypes (P,D) → (B,P,h,w), ReLU'd against round-off below zero."""
    B, D, h, w = z.shape
    zf = z.flatten(2)  # (B,D,hw)
    z2 = zf.square().sum(1, keepdim=True)  # (B,1,hw)
    p2 = prototypes.square().sum(1)[None, :, None]  # (1,P,1)
    # one fused batched matmul: (‖z‖² + ‖p‖²) − 2·P·Z (push spends ~7 % less than with einsum + 3 passes)
    d = torch.baddbmm(z2 + p2, prototypes.expand(B, -1, -1), zf, alpha=-2)  # (B,P,hw)
    return d.clamp_min(0).view(B, -1, h, w)


@_fp32
def cosine_distances(z: Tensor, prototypes: Tensor) -> Tensor:
    """1 − cos(z_hw, p_j) ∈ [0, 2] in fp32: (B,D,h,w), (P,D) → (B,P,h,w)."""
    return 1 - torch.einsum("bdhw,pd->bphw", F.normalize(z, dim=1), F.normalize(prototypes, dim=1))


def distances(z: Tensor, prototypes: Tensor, kind: str) -> Tensor:
    """(B,P,h,w) distances of `kind` ("log_l2": squared L2, "cosine": 1 − cos), in fp32."""
    return l2_distances(z, prototypes) if kind == "log_l2" else cosine_distances(z, prototypes)


def similarity_from_distance(d: Tensor, kind: str) -> Tensor:
    """log-L2: log((d+1)/(d+ε)) (large for close patches, → 0 far away); cosine: cos = 1 − d. fp32 like d."""
    with torch.autocast(device_type=d.device.type, enabled=False):
        d = d.float()
        return torch.log((d + 1) / (d + LOG_EPS)) if kind == "log_l2" else 1 - d
