"""Checkpoints with Orbax: the latest training state and the best weights.

A work directory holds

    checkpoints/<step>/   the whole training state (params, optimiser state, averaging
                          state, carry, step) and a JSON record of the loop's position
                          and history;
    best/<step>/          the weights with the best validation loss so far (the averaged
                          weights once NT-ASGD is on), with their record.

Saves are synchronous and atomic (Orbax writes to a temporary directory and renames
it), so an interrupted save never leaves a checkpoint that passes for complete. A
checkpoint that cannot be restored raises `CheckpointError` (`ShapeMismatchError` when
it holds arrays of other shapes than asked for: another model configuration); it never
silently starts afresh, and never advises deleting a checkpoint: `best/` keeps a single
step, the only copy of the best weights.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from mos_jax.errors import CheckpointError


class ShapeMismatchError(CheckpointError):
    """A checkpoint holds arrays of other shapes than the configuration asks for."""


# Orbax's message for an array restored into another shape (the v0 and v1 APIs).
_SHAPES = re.compile(r"[Rr]equested shape:?\s*(\([^)]*\)).*?stored shape:?\s*(\([^)]*\))",
                     re.S)


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
        self._check_shapes(manager, step, abstract, what)
        try:
            restored = manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
        except Exception as e:
            where = f"{manager.directory}/{step}"
            shapes = _SHAPES.search(str(e))
            if shapes:
                raise ShapeMismatchError(
                    f"the {what} checkpoint {where} was written for another model "
                    f"configuration: it holds an array of shape {shapes.group(2)} where "
                    f"this config needs {shapes.group(1)}. Use the config it was trained "
                    "with (its work directory's config.json), or a new --workdir; the "
                    "checkpoint is intact, keep it.") from None
            raise CheckpointError(
                f"the {what} checkpoint {where} cannot be restored "
                f"({type(e).__name__}: {str(e)[:300]}): it is damaged. "
                f"{self._fallback_advice(manager, step)}") from None
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
                f"read ({type(e).__name__}: {str(e)[:300]}): it is damaged. "
                f"{self._fallback_advice(self._latest, step)}") from None
        return dict(restored.meta)

    @staticmethod
    def _check_shapes(manager: ocp.CheckpointManager, step: int, abstract: Any,
                      what: str) -> None:
        """Raise `ShapeMismatchError` when the arrays stored at `step` have other shapes
        than `abstract`'s, before any array is read (a failed restore leaves Orbax's
        background reads to die noisily). Unreadable metadata: the restore decides."""
        have = CheckpointStore._stored_shapes(manager, step)
        if have is None:
            return
        want = {jax.tree_util.keystr(k): tuple(v.shape) for k, v in
                jax.tree_util.tree_flatten_with_path(abstract)[0]}
        differ = [k for k in want if k in have and have[k] != want[k]]
        if differ:
            listed = "; ".join(f"{k}: stored {have[k]}, this config needs {want[k]}"
                               for k in differ[:4])
            more = f" (and {len(differ) - 4} more)" if len(differ) > 4 else ""
            raise ShapeMismatchError(
                f"the {what} checkpoint {manager.directory}/{step} was written for a model "
                f"of other sizes than this config describes: {listed}{more}. Use the "
                "config it was trained with (its work directory's config.json), or a new "
                "--workdir; the checkpoint is intact, keep it.")

    @staticmethod
    def _stored_shapes(manager: ocp.CheckpointManager, step: int) -> dict | None:
        """`{path: shape}` of the arrays stored at `step` (paths as
        `jax.tree_util.keystr` writes them), from the metadata alone; None when it
        cannot be read."""
        handler = ocp.StandardCheckpointHandler()
        try:
            stored = handler.metadata(Path(manager.directory) / str(step) / "state")
            stored = getattr(stored, "tree", stored)
            return {jax.tree_util.keystr(k): tuple(v.shape) for k, v in
                    jax.tree_util.tree_flatten_with_path(stored)[0]}
        except Exception:
            return None
        finally:
            handler.close()

    def latest_shapes(self) -> dict | None:
        """`{path: shape}` of the latest training checkpoint's arrays (no array read;
        None without a checkpoint or readable metadata): what a restore can ask for."""
        step = self._latest.latest_step()
        return None if step is None else self._stored_shapes(self._latest, step)

    @staticmethod
    def _fallback_advice(manager: ocp.CheckpointManager, step: int) -> str:
        """What to do about a damaged step, never deleting the last copy of weights."""
        older = [s for s in manager.all_steps() if s < step]
        if older:
            return (f"To resume from step {max(older)} instead, move {manager.directory}/"
                    f"{step} out of {manager.directory} (keep it until the run has "
                    "resumed), or use a new --workdir.")
        return (f"It is the only step in {manager.directory}: do not delete it (a copy "
                "from a backup can replace it); use a new --workdir to start afresh.")

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
        """Close both managers (again: nothing). Every path out of a user of the store,
        errors included, should close it: Orbax's background machinery otherwise
        complains at exit ("Event loop is closed")."""
        if getattr(self, "_closed", False):
            return
        self._closed = True
        self._latest.close()
        self._best.close()

    def __enter__(self) -> "CheckpointStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
