"""A Pipeline that plans and runs nothing: `planning_copy(pipe)` is small and picklable, and its `plan()` is
Pipeline.plan itself (the same checks, defaults and error messages), so a server's front end on another machine
(the Ray Serve ingress, sdrt.serve.ray_remote) refuses a bad request at POST time, before it reaches a worker.

What the copy cannot know stays with the worker that runs the request (it plans again there):
- the memory budget (host memory of the worker's machine, and init images' pixel limit derived from it);
- a fixed-shape backend's profiles (TensorRT engines): the copy's backend runs every shape;
- LoRA files that are not registered yet (only registered names are known to the copy).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from sdrt.model.facts import ModelFacts


@dataclasses.dataclass
class PlanningSource:
    """The part of a ModelSource that plan() reads when no memory check runs."""

    facts: ModelFacts
    scheduler_config: dict
    path: Path  # the model's folder on the worker (its name is in error messages and PNG parameters)


class AnyShapeBackend:
    """A backend stand-in for planning: runs every shape, holds no host memory to check (both are the worker's)."""

    name = "planning"
    uses_host_memory = False

    def check_shapes(self, shapes: dict) -> None:
        return None


class _Elsewhere:
    """A registered LoRA's file as the copy sees it: on the worker's disk, never this machine's."""

    def exists(self) -> bool:
        return False


@dataclasses.dataclass
class RegisteredName:
    """A registered LoRA as the copy knows it: its name only."""

    name: str
    path: _Elsewhere = dataclasses.field(default_factory=_Elsewhere)


def planning_copy(pipe):
    """A Pipeline with `pipe`'s facts, scheduler config and LoRA names and no networks, tokenizer or weights."""
    from sdrt.pipeline import Pipeline

    copy = Pipeline.__new__(Pipeline)  # no __init__: nothing to load
    copy.source = PlanningSource(pipe.facts, dict(pipe.source.scheduler_config), Path(pipe.source.path))
    copy.facts = pipe.facts
    copy.backend = AnyShapeBackend()
    copy.tokenizer = None
    copy.token_table = None
    copy.textual_inversions = {token: list(tokens) for token, tokens in pipe.textual_inversions.items()}
    copy.loras = []
    copy.registered_loras = {name: RegisteredName(name) for name in pipe.registered_loras}
    copy.active_loras = ()
    copy.max_memory = False  # the budget is the worker's: checked there
    return copy
