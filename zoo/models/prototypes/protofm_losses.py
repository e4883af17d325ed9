"""ProtoFM's objective terms for a prototype head over frozen patch tokens (REFERENCES.md §1, ProtoFM).

For projected patch tokens z (B,D,h,w), prototypes p (P,D) and the prototype→class layer W (K,P):

    assignment   student–teacher: the teacher's soft assignment of each patch to the teacher
                 prototypes p̄, softmax(cos(z, p̄)/τ_t), sharpened (τ_t < τ_s) and detached, is the
                 target of the student's assignment log_softmax(cos(z, p)/τ_s): mean cross-entropy
                 over patches.
    alignment    each patch is pulled to its (teacher-)assigned prototype: mean (1 − cos(z_i, p_a(i))),
                 0 exactly when every patch equals its prototype's direction.
    contrastive  prototypes of different classes are pushed apart: mean over cross-class pairs of
                 relu(cos(p_j, p_k)), 0 when they are orthogonal (or opposed).
    sparsity     L1 of W, so each class uses few prototypes.

The teacher (ProtoFM's student–teacher scheme, as in DINO): p̄ is an exponential moving average of the
student prototypes, p̄ ← m·p̄ + (1−m)·p after every optimiser step (:func:`ema_update`, called by the
model), never a gradient target; the projection z is shared and detached on the teacher's side. Only
the paper's abstract-level description was found here (no code or equations), so the EMA follows DINO's
teacher; m = 0 gives the student itself with a stop-gradient. CE on the logits is added by the caller.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def patch_cosine(z: Tensor, prototypes: Tensor) -> Tensor:
    """(B,D,h,w), (P,D) → (B,N,P) cosine of every patch token with every prototype."""
    tokens = F.normalize(z.flatten(2).transpose(1, 2), dim=-1)  # (B,N,D)
    return tokens @ F.normalize(prototypes, dim=-1).T


def assignment_loss(cos: Tensor, student_temp: float, teacher_temp: float,
                    teacher_cos: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Student–teacher assignment CE and the (detached) teacher's hard assignment (B,N).

    cos: the student's patch–prototype cosines (B,N,P); teacher_cos: the teacher prototypes' (default
    ``cos`` itself, a momentum-0 teacher)."""
    if not 0 < teacher_temp < student_temp:
        raise ValueError(f"need 0 < teacher_temp < student_temp to sharpen, got {teacher_temp}, {student_temp}")
    teacher = ((cos if teacher_cos is None else teacher_cos).detach() / teacher_temp).softmax(-1)
    student = F.log_softmax(cos / student_temp, dim=-1)
    return -(teacher * student).sum(-1).mean(), teacher.argmax(-1)


def alignment_loss(cos: Tensor, assigned: Tensor) -> Tensor:
    """Mean 1 − cos(patch, its assigned prototype); gradient reaches both patches and prototypes."""
    return (1 - cos.gather(-1, assigned[..., None])).mean()


def contrastive_loss(prototypes: Tensor, prototype_class: Tensor) -> Tensor:
    """Mean relu(cos) over pairs of prototypes of different classes."""
    p = F.normalize(prototypes, dim=-1)
    cross = prototype_class[:, None] != prototype_class[None, :]
    if not cross.any():
        return prototypes.sum() * 0
    return (p @ p.T).clamp_min(0)[cross].mean()


def sparsity_loss(last_layer_weight: Tensor) -> Tensor:
    return last_layer_weight.abs().sum()


@torch.no_grad()
def ema_update(teacher: Tensor, student: Tensor, momentum: float) -> None:
    """In place: teacher ← momentum·teacher + (1 − momentum)·student (no gradient involved); the model
    checks momentum ∈ [0, 1) once, at construction (this runs every optimiser step)."""
    teacher.mul_(momentum).add_(student.detach().to(teacher.dtype), alpha=1 - momentum)


def protofm_terms(z: Tensor, prototypes: Tensor, prototype_class: Tensor, last_layer_weight: Tensor,
                  student_temp: float = 0.1, teacher_temp: float = 0.04,
                  teacher_prototypes: Tensor | None = None) -> dict[str, Tensor]:
    """The four ProtoFM terms (unweighted) for one batch; the teacher's prototypes default to the
    student's (momentum 0)."""
    cos = patch_cosine(z, prototypes)
    teacher_cos = None if teacher_prototypes is None else patch_cosine(z.detach(), teacher_prototypes.detach())
    assign, assigned = assignment_loss(cos, student_temp, teacher_temp, teacher_cos)
    return {"assign": assign, "align": alignment_loss(cos, assigned),
            "contrast": contrastive_loss(prototypes, prototype_class),
            "sparsity": sparsity_loss(last_layer_weight)}
