"""Orbax checkpoints of the train state and the data position, one folder per step under workdir/checkpoints."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp


class Checkpoints:
    """Asynchronous, atomic saves (Orbax writes a temporary folder and renames it); restores the latest."""

    def __init__(self, directory: Path, keep: int):
        self.directory = directory
        self.manager = ocp.CheckpointManager(
            directory.resolve(),
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data: dict) -> None:
        """Starts an asynchronous save of `state` and the JSON-able data position `data` at `step`."""
        self.manager.save(
            step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data))
        )

    def restore(self, step: int, target: Any) -> tuple[Any, dict]:
        """The state at `step`, laid out (shapes, dtypes, shardings) like `target`, and its data position."""
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
        restored = self.manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore())
        )
        return restored.state, restored.data

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
