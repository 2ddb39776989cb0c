"""Checkpoints with Orbax: the latest training state and the best weights.

A work directory holds

    checkpoints/<step>/   the whole training state (params, optimiser state, averaging
                          state, carry, step) and a JSON record of the loop's position
                          and history;
    best/<step>/          the weights with the best validation loss so far (the averaged
                          weights once NT-ASGD is on), with their record.

Saves are synchronous and atomic (Orbax writes to a temporary directory and renames
it), so an interrupted save never leaves a checkpoint that passes for complete. A
checkpoint that cannot be restored raises `CheckpointError`; it never silently starts
afresh.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orbax.checkpoint as ocp

from mos_jax.errors import CheckpointError


def _manager(directory: Path, keep: int, read_only: bool = False) -> ocp.CheckpointManager:
    # Readers open without creating anything (Orbax's read_only mode logs warnings on
    # every open; nothing here writes through a reader's manager anyway).
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, enable_async_checkpointing=False, create=not read_only)
    return ocp.CheckpointManager(directory, options=options)


class CheckpointStore:
    """The `checkpoints/` and `best/` managers of one work directory."""

    def __init__(self, workdir: str | Path, read_only: bool = False):
        self.workdir = Path(workdir).absolute()
        self.read_only = read_only
        if read_only and not self.workdir.is_dir():
            raise CheckpointError(f"no work directory at {self.workdir}")
        self._latest = _manager(self.workdir / "checkpoints", keep=2, read_only=read_only)
        self._best = _manager(self.workdir / "best", keep=1, read_only=read_only)

    @staticmethod
    def _save(manager: ocp.CheckpointManager, step: int, tree: Any, meta: dict) -> None:
        if step in manager.all_steps():
            manager.delete(step)  # the same step saved again with a newer record
        manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(tree), meta=ocp.args.JsonSave(meta)), force=True)
        manager.wait_until_finished()

    def _restore(self, manager: ocp.CheckpointManager, abstract: Any, what: str,
                 step: int | None = None) -> tuple[Any, dict]:
        step = manager.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no {what} checkpoint in {manager.directory}")
        try:
            restored = manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
        except Exception as e:
            raise CheckpointError(
                f"the {what} checkpoint {manager.directory}/{step} cannot be restored "
                f"({type(e).__name__}: {str(e)[:300]}). It is damaged or was written "
                "for another model configuration: use a new --workdir, or delete that "
                "step's directory to fall back to an older one.") from None
        return restored.state, dict(restored.meta)

    def latest_step(self) -> int | None:
        return self._latest.latest_step()

    def latest_meta(self) -> dict:
        """The JSON record of the latest training checkpoint alone (no arrays read)."""
        step = self._latest.latest_step()
        if step is None:
            raise CheckpointError(f"no training checkpoint in {self._latest.directory}")
        try:
            restored = self._latest.restore(step, args=ocp.args.Composite(
                meta=ocp.args.JsonRestore()))
        except Exception as e:
            raise CheckpointError(
                f"the record of checkpoint {self._latest.directory}/{step} cannot be "
                f"read ({type(e).__name__}: {str(e)[:300]}): delete that step's "
                "directory to fall back to an older one, or use a new --workdir") from None
        return dict(restored.meta)

    def save(self, step: int, tree: Any, meta: dict) -> None:
        self._save(self._latest, step, tree, meta)

    def restore(self, abstract: Any) -> tuple[Any, dict]:
        """The latest training state (shaped like `abstract`) and its record."""
        return self._restore(self._latest, abstract, "training")

    def has_best(self) -> bool:
        return self._best.latest_step() is not None

    def save_best(self, step: int, params: Any, meta: dict) -> None:
        self._save(self._best, step, params, meta)

    def restore_best(self, abstract_params: Any) -> tuple[Any, dict]:
        return self._restore(self._best, abstract_params, "best-weights")

    def close(self) -> None:
        self._latest.close()
        self._best.close()
