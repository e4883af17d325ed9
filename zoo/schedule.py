"""A training schedule as data: which phase is in force at any epoch, and the one-off steps between.

A schedule is a list of entries, e.g. ProtoPNet's

    [{phase: joint, epochs: 2, clst_weight: 0.0}, {phase: joint, epochs: 4}, {phase: push},
     {phase: last_layer, epochs: 2}]

* an entry whose name is one of the family's *phases* lasts ``epochs`` epochs (≥ 1); its other keys are
  overrides (loss weights) in force for those epochs. The last phase entry may omit ``epochs``: it then
  lasts to the end of training (GdVAE's ``consistency``). Past the schedule's end the last phase stays
  in force.
* an entry whose name is one of the family's *actions* (no ``epochs``) is a one-off step run at the
  boundary where it stands (ProtoPNet's ``push`` at the start of epoch 6 above).

Everything the recipe implies is a pure function of the epoch (:meth:`Schedule.phase_at`,
:meth:`Schedule.actions_at`, :meth:`Schedule.epochs_since_action`), so a run resumed at any epoch,
or each rank of a DDP run, derives the same state; the base class re-applies the phase in force at
every epoch start and saves the entries in the checkpoint to refuse resuming under another recipe.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence


@dataclass(frozen=True)
class Phase:
    """One phase of a schedule: ``name`` for epochs ``start`` … ``start + epochs - 1``."""

    name: str
    index: int  # position among the schedule's phase entries (two "joint" entries are 0 and 1)
    start: int
    epochs: int | None  # None: lasts to the end of training
    overrides: Mapping[str, Any] = field(default_factory=dict)  # e.g. {"clst_weight": 0.0}

    def covers(self, epoch: int) -> bool:
        return self.start <= epoch and (self.epochs is None or epoch < self.start + self.epochs)


class Schedule:
    """The recipe of ``entries`` for a family whose phases are ``phases`` and actions ``actions``."""

    def __init__(self, entries: Iterable[Mapping[str, Any]] | None, phases: Sequence[str],
                 actions: Sequence[str] = ()) -> None:
        self.entries: list[dict[str, Any]] = [dict(e) for e in entries or ()]
        self.phases: list[Phase] = []
        self.actions: list[tuple[int, str]] = []  # (boundary epoch, name), in schedule order
        start = 0
        for i, entry in enumerate(self.entries):
            name = entry.get("phase")
            if name in actions:
                if "epochs" in entry:
                    raise ValueError(f"schedule entry {i}: {name!r} is a one-off step and takes no 'epochs'")
                self.actions.append((start, name))
                continue
            if name not in phases:
                raise ValueError(f"schedule entry {i}: unknown phase {name!r}; expected one of "
                                 f"{tuple(phases) + tuple(actions)}")
            if self.phases and self.phases[-1].epochs is None:
                raise ValueError(f"schedule entry {i}: phase {self.phases[-1].name!r} has no 'epochs' "
                                 "(it lasts to the end), so no phase may follow it")
            epochs = entry.get("epochs")
            if epochs is not None and (int(epochs) != epochs or epochs < 1):
                raise ValueError(f"schedule entry {i}: 'epochs' must be an integer ≥ 1, got {epochs!r}")
            overrides = {k: v for k, v in entry.items() if k not in ("phase", "epochs")}
            self.phases.append(Phase(name, len(self.phases), start, None if epochs is None else int(epochs),
                                     overrides))
            start += int(epochs or 0)

    @property
    def total_epochs(self) -> int:
        """Epochs the schedule spells out (an open-ended last phase counts 0)."""
        return sum(p.epochs or 0 for p in self.phases)

    def phase_at(self, epoch: int) -> Phase | None:
        """The phase in force at ``epoch`` (the last one after the schedule's end; None if there is none)."""
        for phase in self.phases:
            if phase.covers(epoch):
                return phase
        return self.phases[-1] if self.phases else None

    def actions_at(self, epoch: int) -> list[str]:
        """One-off steps standing at the boundary before ``epoch``, in schedule order."""
        return [name for boundary, name in self.actions if boundary == epoch]

    def epochs_since_action(self, name: str, epochs_run: int) -> range:
        """The epochs among ``range(epochs_run)`` trained after the last ``name`` that ran (all of
        them when none ran): e.g. the epochs whose prototype updates the last push did not see."""
        done = [b for b, n in self.actions if n == name and b < epochs_run]
        return range(max(done) if done else 0, epochs_run)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Schedule) and self.entries == other.entries

    def __repr__(self) -> str:
        return f"Schedule({self.entries})"
