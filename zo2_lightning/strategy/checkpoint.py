"""The zo2 entry of a Lightning checkpoint: what resuming a ZO run needs beyond the weights and Lightning's loops.

``ResumeState(seed=..., skipped_steps=..., ...).write(checkpoint)`` when saving;
``state = ResumeState.read(checkpoint, path)`` when loading (``None`` for a checkpoint of another strategy).

The entry holds the run seed (every z is regenerated from it, so no RNG state is saved), the count of skipped
steps, the update rule's buffers (momentum, Adam moments, the update count) and the layout it was written under
(world size, direction mode, ranks per perturbation-parallel group; an entry without the last was written by a
version without groups, which is groups of 1). Its ``format`` number is checked on load, so a file written by a later version that
changed the entry is refused with a message instead of being misread.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lightning.fabric.utilities.types import _PATH

CHECKPOINT_KEY = "zo2_lightning"
#: the entry's layout; raise it whenever a field changes meaning, and read the older ones explicitly
FORMAT = 1


@dataclass(frozen=True)
class ResumeState:
    """The zo2 entry of one checkpoint.

    Attributes:
        seed: the run seed of the directions.
        skipped_steps: steps skipped so far for a non-finite loss.
        world_size: the number of ranks that wrote it.
        directions: ``"shared"`` or ``"independent"`` (how the ranks drew their directions).
        rule_state: the update rule's state (``ZOEngine.rule_state()``), ``None`` when saved outside a fit.
        perturbation_parallel: ranks per group that split each step's runs (1: data parallel only).
    """

    seed: int
    skipped_steps: int = 0
    world_size: int = 1
    directions: str = "shared"
    rule_state: dict[str, Any] | None = None
    perturbation_parallel: int = 1

    def write(self, checkpoint: dict[str, Any]) -> None:
        """Put the entry into ``checkpoint`` (the dict Lightning is about to save)."""
        entry: dict[str, Any] = {"format": FORMAT, "seed": self.seed, "skipped_steps": self.skipped_steps,
                                 "world_size": self.world_size, "directions": self.directions,
                                 "perturbation_parallel": self.perturbation_parallel}
        if self.rule_state is not None:
            entry["rule_state"] = self.rule_state
        checkpoint[CHECKPOINT_KEY] = entry

    @classmethod
    def read(cls, checkpoint: dict[str, Any], path: _PATH) -> ResumeState | None:
        """The entry of a loaded checkpoint, or ``None`` if it has none (another strategy wrote it).

        Raises:
            ValueError: the entry has a format this version does not read.
        """
        entry = checkpoint.get(CHECKPOINT_KEY)
        if entry is None:
            return None
        found = entry.get("format")
        if found != FORMAT:
            raise ValueError(
                f"{path} has a zo2_lightning entry of format {found!r}; this version of zo2_lightning reads format"
                f" {FORMAT}. Resume it with the zo2_lightning version that wrote it, or start a new fit from its"
                " weights: `module.load_state_dict(torch.load(path, weights_only=True)['state_dict'])`, then"
                " `trainer.fit(module)` without ckpt_path."
            )
        return cls(seed=int(entry["seed"]), skipped_steps=int(entry.get("skipped_steps", 0)),
                   world_size=int(entry.get("world_size", 1)), directions=str(entry.get("directions", "shared")),
                   rule_state=entry.get("rule_state"),
                   perturbation_parallel=int(entry.get("perturbation_parallel", 1)))

    def layout_warning(self, world_size: int, directions: str, perturbation_parallel: int = 1) -> str | None:
        """Why resuming under ``world_size`` ranks in groups of ``perturbation_parallel`` and ``directions`` does
        not continue the run, if it does not.

        Shared directions resume on any world size and any grouping (the step is MeZO on the global batch, however
        its runs are split); independent ones only with as many groups as wrote them (each group draws its own
        directions, so the number of directions per step would change).
        """
        if "independent" not in (directions, self.directions):
            return None
        groups, saved_groups = world_size // perturbation_parallel, self.world_size // self.perturbation_parallel
        if saved_groups == groups and self.directions == directions:
            return None
        return (
            f"zo2_offload: resuming a run saved with directions={self.directions!r} on {self.world_size} rank(s)"
            f" in {saved_groups} group(s) with directions={directions!r} on {world_size} in {groups}: the number"
            " of directions per step changes, so the run does not continue as it would have. Resume with as many"
            " groups (world size / perturbation_parallel), or train with directions='shared' (which resumes on any"
            " world size and layout)."
        )


def refuse_foreign_checkpoint(path: _PATH) -> None:
    """``fit`` cannot resume a checkpoint without the zo2 entry.

    Raises:
        ValueError: always, naming how to start from its weights instead.
    """
    raise ValueError(
        f"{path} was not written by a zo2 strategy (it has no {CHECKPOINT_KEY!r} entry), so fit cannot resume it:"
        " its optimizer state and step count belong to another run and the ZO seed is unknown. To start ZO"
        " fine-tuning from its weights, load them and fit from step 0:"
        " `module.load_state_dict(torch.load(path, weights_only=True)['state_dict'])`, then `trainer.fit(module)`"
        " without ckpt_path."
    )
