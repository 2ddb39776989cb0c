"""The placement plan: which devices run a computation, and how batches reach them.

A `Plan` is one object for any device count. Its methods are the same whatever the
strategy:

- `map(body, in_axes, out_axes, donate_argnums)`: a per-device `body` run over the
  plan's devices. An axis entry (a pytree prefix of the argument) is `None` for a
  replicated value or `k` for one whose batch columns lie on axis `k`. The returned
  function takes this process's columns of host batches (NumPy) and the global layout
  of device values, and returns the global layout.
- `axis_name`: the collectives' axis inside `body` (None on one device: no collectives).
- feeding and fetching: `place` / `place_state` (values into the global layout),
  `place_carry`, `local_columns` / `host_slice` (this host's columns of a batch),
  `fetch` (this process's columns of a result), `gather_columns` (every process's).
- `map_step(step)`: a train step built with `axis_name=plan.axis_name` (see
  `mos_jax.train.build_train_step`) run over the plan's devices, state in the global layout.
- `for_batch` / `one_device`: the plan itself, or its first local device alone for work
  whose columns do not split over the devices (with a note, once).

Two strategies, chosen by `config.parallel.strategy`:

- `OneDevice` ("none", and any single-device run): `map` is `jax.jit` itself, values
  stay where they are; exactly the plain single-device program.
- `MeshPlan` ("mesh", the default with several devices): `jax.jit` of `jax.shard_map`
  over a `[data, model]` `Mesh` (`parallel.mesh`); arrays are global `jax.Array`s with
  `NamedSharding`s placed by their logical axes through `parallel.rules` (`Plan.spec`):
  batch columns and the carry's rows over `data`, vocabulary rows over `model`, the
  rest replicated. The train step computes gradients in `shard_map` and updates on
  the global arrays (`MeshStep`).

There is no `pmap` strategy: the mesh computes what it computed (the same numbers; the
2-process and dropout tests compared them until it was removed), and it splits the
vocabulary, which `pmap` could not.

Gradient averaging. A data-parallel body computes the gradient of its own columns'
mean loss and `lax.pmean`s it over `AXIS` before the update, so every device applies
the same update, equal to the single-device update of the whole batch (every device
holds the same number of columns). The mesh runs the body with no varying-axis
checking (`shard_map(..., check_vma=False)`): with the check on, `grad` with respect to replicated (axis-invariant)
parameters returns the gradient already *summed* over the axis, and the explicit
`pmean` would then give `n_devices` times the mean gradient.

Layouts. Whatever the strategy, a training loop holds its `TrainState` in one global
layout (`layout`): every leaf a global array over the mesh, the carry `[B, H]` split
by rows (columns of the batch) over `data`, vocabulary-sized parameters and their
optimiser state by rows over `model`, the rest replicated. That is also the checkpoint
layout, so a checkpoint restores under any strategy, device count or mesh shape, or on
one device (`abstract`).

Multi-host. `from_config` joins a multi-process run (`jax.distributed.initialize`) from
`config.parallel` or the environment. Devices are ordered process by process, so host
`p` holds one contiguous block of columns and reads only those (`local_columns`).
Every process calls the checkpoint functions; only process 0 writes logs and metrics
(`is_primary`). Decisions that depend on a clock or a signal are agreed between
processes (`agree`) at logging steps, so that all take the same branch at the same step.

Global batch sizes must divide by the data axis's groups (`check_divisible` names the
nearest valid sizes); evaluation batches that do not (the test batch of 1, say) run
on one device instead (`for_batch`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mos_jax import collectives
from mos_jax.errors import ConfigError, note

AXIS = "data"  # the mesh axis of batch columns; the data-parallel collectives' axis name
MODEL_AXIS = "model"  # the mesh axis that splits the vocabulary (and its parameters)
MESH_AXES = (AXIS, MODEL_AXIS)
# Logical axis name -> mesh axis ("" replicated): `parallel.rules`. The defaults split
# batch columns over `data` and every vocabulary axis over `model`.
DEFAULT_RULES = (("batch", AXIS), ("vocab", MODEL_AXIS))
# The settings of one launch of a multi-process run (not saved with a run's config).
CLUSTER_DEFAULTS = {"coordinator_address": "", "num_processes": 0, "process_id": -1}


def shard_map(f, *, mesh, in_specs, out_specs):
    """`jax.shard_map` without varying-axis checks (the per-device bodies `pmean`
    their gradients themselves; see the module docstring)."""
    if hasattr(jax, "shard_map"):
        return jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs,
                             check_vma=False)
    from jax.experimental.shard_map import shard_map as legacy  # JAX < 0.6
    return legacy(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_rep=False)


# ----------------------------------------------------------------- batch arithmetic

def check_divisible(batch_size: int, n_devices: int, key: str = "data.batch_size",
                    local_devices: int | None = None, over: str | None = None) -> int:
    """Columns per device; a `ConfigError` naming the nearest valid sizes otherwise.
    `over`: what the `n_devices` parts are, for the message (default "N devices")."""
    if batch_size >= n_devices and batch_size % n_devices == 0:
        return batch_size // n_devices
    below = batch_size // n_devices * n_devices
    above = below + n_devices
    sizes = " or ".join(str(s) for s in (below, above) if s > 0)
    hint = ""
    if local_devices is not None:  # single process: fewer devices is another way out
        counts = [k for k in range(1, min(local_devices, batch_size) + 1)
                  if batch_size % k == 0]
        hint = (f", or use fewer devices: --config.parallel.num_devices one of {counts}")
    raise ConfigError(
        f"{key}={batch_size} does not split over {over or f'{n_devices} devices'} (the columns are "
        f"divided equally): use a multiple of {n_devices}, the nearest being {sizes} "
        f"(--config.{key}=...){hint}")


# ------------------------------------------------------------------------ multi-host

def _env_int(name: str) -> int | None:
    value = os.environ.get(name, "").strip()
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment variable {name}={value!r} is not an integer") from None


def initialize_distributed(coordinator_address: str = "", num_processes: int = 0,
                           process_id: int = -1) -> bool:
    """Join a multi-process run; True when this process is part of one.

    `coordinator_address` is process 0's `host:port`; "" reads `JAX_COORDINATOR_ADDRESS`
    and, when that is unset too, runs as a single process; "auto" leaves everything to
    JAX's cluster detection (Slurm, Open MPI, Cloud TPU, ...). `num_processes` 0 and
    `process_id` -1 read `JAX_NUM_PROCESSES` / `JAX_PROCESS_ID`, else JAX detects them.
    Must run before any JAX computation. Calling it again is a no-op.
    """
    if jax.distributed.is_initialized():
        return True
    address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS", "")
    n = num_processes if num_processes > 0 else _env_int("JAX_NUM_PROCESSES")
    pid = process_id if process_id >= 0 else _env_int("JAX_PROCESS_ID")
    if not address:
        if (n or 1) > 1:
            raise ConfigError(
                f"parallel.num_processes={n} needs the coordinator: set "
                "--config.parallel.coordinator_address=HOST:PORT (process 0's address, the "
                "same on every process) or JAX_COORDINATOR_ADDRESS")
        return False
    kwargs: dict[str, Any] = {}
    if address != "auto":
        kwargs["coordinator_address"] = address
    if n is not None:
        kwargs["num_processes"] = n
    if pid is not None:
        kwargs["process_id"] = pid
    try:
        jax.distributed.initialize(**kwargs)
    except RuntimeError as e:
        raise ConfigError(
            f"cannot join the multi-process run at {address}: {e}. Multi-process "
            "training must initialise before any other JAX work in the process (start "
            "it with `mos-jax train`, or call mos_jax.parallel.initialize_distributed "
            "first)") from None
    except (ValueError, TypeError) as e:
        raise ConfigError(
            f"cannot join the multi-process run ({e}): give parallel.coordinator_address, "
            "parallel.num_processes and parallel.process_id (or JAX_COORDINATOR_ADDRESS, "
            "JAX_NUM_PROCESSES, JAX_PROCESS_ID)") from None
    return True


# ---------------------------------------------------------------------- the plan

def _is_sharded(path) -> bool:
    return any(getattr(k, "key", getattr(k, "name", None)) == "carry" for k in path)


@dataclasses.dataclass(frozen=True)
class Like:
    """An `out_axes` entry: the output is laid out like input argument `index` (a
    tree of parameters' shape that comes back updated, such as gradient sums)."""

    index: int


def _is_axis(x) -> bool:
    return x is None or isinstance(x, (int, P, Like))


def _is_spec(x) -> bool:
    return isinstance(x, P)


def _divisors(n: int, at_most: int) -> list[int]:
    return [k for k in range(1, at_most + 1) if n % k == 0]


def _whole(x, device):
    """`x` as one whole array on `device`: a replicated global array's local copy, a
    split one gathered (from every process where it spans several)."""
    if not isinstance(x, jax.Array) or len(x.sharding.device_set) == 1:
        return x
    if x.sharding.is_fully_replicated:
        return x.addressable_data(0)
    if x.is_fully_addressable:
        return jax.device_put(x, jax.sharding.SingleDeviceSharding(device))
    from jax.experimental import multihost_utils
    return jax.device_put(multihost_utils.process_allgather(x, tiled=True), device)


def _each(axes, tree, fn):
    """`fn(leaf, axis)` for every leaf of `tree`, `axes` a prefix of it (None or int)."""
    return jax.tree_util.tree_map(
        lambda ax, sub: jax.tree_util.tree_map(lambda x: fn(x, ax), sub),
        axes, tree, is_leaf=_is_axis)


def _spec(axis: int | P | None) -> P:
    if isinstance(axis, P):
        return axis
    return P() if axis is None else P(*([None] * axis), AXIS)


def _default_device():
    device = jax.config.jax_default_device
    if not isinstance(device, jax.Device):
        device = sorted(jax.local_devices(), key=lambda d: d.id)[0]
    return device


class NullMetrics:
    """`MetricsWriter`'s interface, writing nothing (processes other than 0)."""

    def write(self, record: dict) -> None:
        pass


class NullStream:
    """A text stream that discards everything (progress lines of other processes)."""

    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False


@dataclasses.dataclass(frozen=True)
class Plan:
    """Which devices take part, and how (the strategy is the subclass).

    `devices` lists every participating device of every process, process by process;
    every process uses the same number of its own devices. Hashable, so compiled
    functions are cached per plan.
    """

    devices: tuple
    model_size: int = 1  # devices along the `model` mesh axis (parallel.mesh.model)
    rules: tuple = DEFAULT_RULES  # (logical axis, mesh axis or "") pairs
    strategy = ""  # the name in `config.parallel.strategy` (set by each subclass)
    axis_name = AXIS  # the collectives' axis inside mapped bodies

    # -- topology
    @functools.cached_property
    def mesh(self) -> Mesh:
        """`[data, model]` devices: each run of `model_size` consecutive devices (one
        process's, see `_plan`) is one group that splits the vocabulary."""
        grid = np.array(self.devices, dtype=object).reshape(self.n_data, self.model_size)
        return Mesh(grid, MESH_AXES)

    @property
    def n_devices(self) -> int:
        return len(self.devices)

    @property
    def n_data(self) -> int:
        """Devices along the data axis: the groups the batch columns split over."""
        return len(self.devices) // self.model_size

    def mesh_axis(self, logical: str) -> str | None:
        """The mesh axis the rules map logical axis `logical` to; None when replicated
        (no rule, "", or a mesh axis of one device)."""
        axis = dict(self.rules).get(logical) or None
        if axis is None or self.axis_sizes[axis] == 1:
            return None
        return axis

    @property
    def axis_sizes(self) -> dict[str, int]:
        """Devices along each mesh axis."""
        return {AXIS: self.n_data, MODEL_AXIS: self.model_size}

    @property
    def vocab_axis(self) -> str | None:
        """The mesh axis splitting the vocabulary inside mapped bodies, or None."""
        return self.mesh_axis("vocab")

    def check_vocab(self, vocab_size: int, head: str | None = None,
                    words: int | None = None, trained: bool = False) -> None:
        """ConfigError unless a vocabulary of `vocab_size` rows (and `head`) can be split
        over this plan's `vocab` axis. `vocab_size` is the rows of the vocabulary-sized
        parameters, the padded size where `model.vocab_multiple` pads the vocabulary
        (`ModelConfig.padded_vocab_size`); `words` the words V when it does, so that
        every block holds at least one word. `trained`: the rows are a trained model's
        (evaluate, rank, generate): the advice is a model size, not padding."""
        axis = self.vocab_axis
        if axis is None:
            return
        m = self.axis_sizes[axis]
        what = (f"{vocab_size:,}" if words is None or words == vocab_size else
                f"{vocab_size:,} rows ({words:,} words, padded)")
        if vocab_size % m and trained:
            # trained weights fix their rows: only the model size can change (any
            # number of this process's devices that it divides)
            local = jax.local_device_count()
            sizes = [k for k in range(1, local + 1) if vocab_size % k == 0]
            raise ConfigError(
                f"trained weights of {what} do not split into {m} equal blocks "
                f"(parallel.mesh.model={m}; the rows are fixed when training, by "
                f"model.vocab_multiple): use a model size that divides {vocab_size:,} "
                f"({', '.join(map(str, sizes))} on this process's {local} devices)")
        if vocab_size % m:
            # a model size must divide the vocabulary and the devices of each process
            # (`mesh_sizes`; a model group lies within one host)
            hosts = {getattr(d, "process_index", 0) for d in self.devices}
            per_host = self.n_devices // len(hosts)
            sizes = _divisors(math.gcd(vocab_size, per_host), per_host)
            raise ConfigError(
                f"a vocabulary of {what} does not split into {m} equal blocks "
                f"(parallel.mesh.model={m}): pad it with --config.model.vocab_multiple="
                f"{m} (or a multiple of {m}, e.g. {m * -(-128 // m)} as GPU/TPU codebases "
                f"do), or use a model size that divides it and the {per_host} devices "
                f"({', '.join(map(str, sizes))})")
        if words is not None and (m - 1) * (vocab_size // m) >= words:
            raise ConfigError(
                f"a vocabulary of {what} split into {m} blocks of {vocab_size // m:,} "
                f"rows leaves the last block without a word: " +
                ("" if trained else "lower model.vocab_multiple or ") +
                f"use a smaller parallel.mesh.model than {m}")

    def spec(self, path, leaf) -> P:
        """A leaf's PartitionSpec by its logical axes: a `carry` leaf's rows are batch
        columns; a parameter declared in `collectives.PARAM_AXES` (also the optimiser
        state mirroring it: the last dict key names it) maps its logical axes with the
        rules; everything else is replicated."""
        if _is_sharded(path):
            return P(self.mesh_axis("batch"))
        names = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
        axes = collectives.PARAM_AXES.get(names[-1]) if names else None
        if axes is None or getattr(leaf, "ndim", None) != len(axes):
            return P()
        mesh_axes = tuple(self.mesh_axis(a) for a in axes)
        return P(*mesh_axes) if any(mesh_axes) else P()

    def specs(self, tree):
        """`spec` of every leaf of `tree`. A leaf in a list, named by no parameter (a
        checkpoint's flat list of the optimiser's own leaves, each shaped like a
        parameter), takes the split spec of a named leaf of its shape in `tree`, so
        that it is written and restored split too."""
        leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
        named = [self.spec(path, leaf) for path, leaf in leaves]
        by_shape = {}  # the split specs of parameters (the carry is none)
        for (path, leaf), spec in zip(leaves, named):
            if spec != P() and not _is_sharded(path):
                by_shape.setdefault(tuple(getattr(leaf, "shape", ())), spec)
        out = [by_shape.get(tuple(getattr(leaf, "shape", ())), spec)
               if (spec == P() and path and isinstance(path[-1], jax.tree_util.SequenceKey)
                   and not _is_sharded(path)) else spec
               for (path, leaf), spec in zip(leaves, named)]
        return jax.tree_util.tree_unflatten(treedef, out)

    def layout(self, tree):
        """The NamedSharding of every leaf of `tree` (`specs`); computed once per tree
        structure and leaf shapes (a train step places its state every step)."""
        leaves, treedef = jax.tree_util.tree_flatten(tree)
        key = (treedef, tuple(tuple(getattr(x, "shape", ())) for x in leaves))
        if key not in self._layouts:
            self._layouts[key] = jax.tree_util.tree_map(
                lambda spec: NamedSharding(self.mesh, spec), self.specs(tree),
                is_leaf=_is_spec)
        return self._layouts[key]

    @functools.cached_property
    def _layouts(self) -> dict:
        return {}

    @functools.cached_property
    def process_index(self) -> int:
        """This process's position among the plan's processes."""
        return sorted({d.process_index for d in self.devices}).index(jax.process_index())

    @functools.cached_property
    def process_count(self) -> int:
        return len({d.process_index for d in self.devices})

    @functools.cached_property
    def local_devices(self) -> tuple:
        return tuple(d for d in self.devices if d.process_index == jax.process_index())

    @property
    def n_local(self) -> int:
        return len(self.local_devices)

    @property
    def is_primary(self) -> bool:
        """Process 0: the one that logs and writes metrics."""
        return self.process_index == 0

    @functools.cached_property
    def replicated(self):
        return NamedSharding(self.mesh, P())

    @functools.cached_property
    def rows(self):
        """Leading axis split over devices (the carry `[B, H]`)."""
        return NamedSharding(self.mesh, P(AXIS))

    def sharding(self, axis: int | None):
        """Replicated (None), or split over the devices along `axis`."""
        return NamedSharding(self.mesh, _spec(axis))

    def describe(self) -> str:
        procs = (f" in {self.process_count} processes ({self.n_local} each)"
                 if self.process_count > 1 else "")
        what = f"data parallel ({self.strategy})"
        if self.model_size > 1:
            how = ("the vocabulary split over model" if self.vocab_axis else
                   "the vocabulary replicated: parallel.rules.vocab is \"\"")
            what = f"mesh data {self.n_data} x model {self.model_size} ({how})"
        return f"{what} over {self.n_devices} {self.devices[0].platform} devices{procs}"

    # -- columns
    def per_device(self, batch_size: int, key: str = "data.batch_size") -> int:
        """Columns per data-axis group (every device of a `model` group holds the
        same columns)."""
        local = len(jax.local_devices()) if self.process_count == 1 else None
        if self.model_size > 1:
            local = None  # fewer devices is not the hint: the data axis is
        return check_divisible(batch_size, self.n_data, key, local, self.columns_over())

    def columns_over(self) -> str:
        """What batch columns split over, for messages: "4 devices", or with a model
        axis "2 groups of 4 devices" (the devices of a group hold the same columns)."""
        if self.model_size == 1:
            return f"{self.n_data} devices"
        return f"{self.n_data} groups of {self.model_size} devices"

    def divides(self, batch_size: int) -> bool:
        return batch_size >= self.n_data and batch_size % self.n_data == 0

    def host_slice(self, batch_size: int) -> slice:
        """The columns this process holds (one contiguous block)."""
        per_host = self.per_device(batch_size) * (self.n_local // self.model_size)
        start = self.process_index * per_host
        return slice(start, start + per_host)

    def local_columns(self, rows: np.ndarray) -> np.ndarray:
        """`rows[..., host_slice]`: this process's share of a batchified `[..., B]`."""
        return rows[..., self.host_slice(rows.shape[-1])]

    def for_batch(self, batch_size: int, log: Callable[[str], None] | None = None,
                  message: str | None = None) -> "Plan":
        """This plan when `batch_size` columns split over its devices; else its first
        local device alone, saying so once (`message`, or the evaluation note)."""
        if self.divides(batch_size):
            return self
        where = " (in every process)" if self.process_count > 1 else ""
        return self.one_device(message or (
            f"evaluation with batch size {batch_size} does not split over "
            f"{self.columns_over()}: it runs on one device{where}"), log)

    def one_device(self, message: str | None = None,
                   log: Callable[[str], None] | None = None) -> "Plan":
        """This process's first device alone, noting `message` once when given."""
        if message is not None:
            self.note(message, log)
        return OneDevice((self.local_devices[0],))

    def note_evaluation(self, batch_sizes, log: Callable[[str], None] | None) -> None:
        """Say, once, which evaluation batch sizes run on one device."""
        for batch_size in sorted(set(batch_sizes)):
            self.for_batch(batch_size, log)

    def note(self, message: str, log: Callable[[str], None] | None) -> None:
        """Say `message` once per plan (process 0 only)."""
        if message in self._notes or not self.is_primary:
            return
        self._notes.add(message)
        (log or note)(message)

    @functools.cached_property
    def _notes(self) -> set:
        return set()

    # -- placement
    def _put(self, x, sharding):
        if isinstance(x, jax.Array):
            if x.sharding == sharding:
                return x
            # Equivalent shardings too are put (no copy), so that the compiled steps
            # always see the same input shardings and never compile again.
            if self.process_count == 1 or not x.is_fully_addressable:
                return jax.device_put(x, sharding)
        value = np.asarray(x)  # a host value, the same on every process
        return jax.make_array_from_callback(value.shape, sharding, lambda idx: value[idx])

    def place(self, tree, shardings):
        """Every leaf of `tree` as a global array with its sharding (a prefix of
        `tree`: one sharding per subtree). Leaves already placed pass through."""
        return jax.tree_util.tree_map(
            lambda s, sub: jax.tree_util.tree_map(lambda x: self._put(x, s), sub),
            shardings, tree)

    def place_state(self, state):
        """A TrainState (or any tree) in the global layout (`layout`): carry split by
        rows, vocabulary-sized parameters and their optimiser state by the rules, the
        rest replicated."""
        return self.place(state, self.layout(state))

    def place_params(self, params):
        """Parameters (or a tree shaped like them) in the global layout (`layout`)."""
        return self.place(params, self.layout(params))

    def abstract(self, tree):
        """`ShapeDtypeStruct`s with the global layout's shardings (`layout`), to
        restore a checkpoint into. Orbax then restores checkpoints written under any
        strategy, device count or mesh shape."""
        return jax.tree_util.tree_map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
            tree, self.layout(tree))

    def place_carry(self, carry):
        """A carry (the caller's: any pytree of arrays with the batch rows first, such
        as `model.init_carry`'s `[B, H]` per layer), split by rows."""
        return self.place(carry, self.rows)

    def feed_batch(self, local: np.ndarray, axis: int = 1) -> jax.Array:
        """This process's columns of a batch (split over `axis`) on the devices, in the
        layout the mapped functions take (they also take the NumPy batch itself)."""
        return self.global_batch(np.asarray(local), axis)

    def global_batch(self, local: np.ndarray, axis: int = 1) -> jax.Array:
        """A global array from this process's columns (split over `axis`)."""
        shape = list(local.shape)
        shape[axis] *= self.process_count
        return jax.make_array_from_process_local_data(self.sharding(axis), local,
                                                      tuple(shape))

    def local_copy(self, tree):
        """Global arrays as whole single-device arrays on this process's first device
        (for work that runs on one device): a replicated one's local copy, a split
        one gathered."""
        return jax.tree_util.tree_map(lambda x: _whole(x, self.local_devices[0]), tree)

    def fetch(self, x, axis: int = 1) -> np.ndarray:
        """This process's columns (split over `axis`) of a mapped function's result."""
        if self.process_count == 1:
            return np.asarray(x)
        blocks = {}  # the devices of a model group hold the same columns: one each
        for shard in x.addressable_shards:
            blocks.setdefault(shard.index[axis].start or 0, shard)
        return np.concatenate([np.asarray(blocks[k].data) for k in sorted(blocks)],
                              axis=axis)

    def gather_columns(self, local: np.ndarray) -> np.ndarray:
        """`[n, B_local, ...]` of every process -> the whole `[n, B, ...]` on every
        process."""
        if self.process_count == 1:
            return local
        from jax.experimental import multihost_utils
        return np.moveaxis(np.asarray(multihost_utils.process_allgather(
            np.ascontiguousarray(np.moveaxis(local, 1, 0)), tiled=True)), 0, 1)

    def agree(self, check: bool, requested: bool, *elapsed: float) -> tuple:
        """The same decision inputs on every process.

        Returns `(requested, *elapsed)`: in one process, as given. With several, on
        steps where `check` holds (the same on all) any process's `requested` (Ctrl-C)
        and process 0's clock readings; on other steps `(False, 0.0, ...)`, so clock-
        and signal-driven actions wait for the next checked step.
        """
        if self.process_count == 1:
            return (requested, *elapsed)
        if not check:
            return (False, *(0.0 for _ in elapsed))
        from jax.experimental import multihost_utils
        values = np.asarray(multihost_utils.process_allgather(
            np.array([float(requested), *elapsed], np.float32)))
        return (bool(values[:, 0].max() > 0), *(float(v) for v in values[0, 1:]))

    # -- mapping
    def map(self, body: Callable, in_axes: tuple, out_axes, donate_argnums=()):
        """`body` run on every device over its columns (see the module docstring)."""
        raise NotImplementedError

    def map_step(self, step):
        """`step` (`(state, inputs, targets, length, seq_len, lr) -> (state, metrics)`,
        a `train.TrainStep` with `gradients` and `update`) over the plan's devices: each
        strategy says how (`OneDevice`: the step itself; `MeshPlan`: `MeshStep`)."""
        raise NotImplementedError


class OneDevice(Plan):
    """One device: `map` is `jax.jit`, and values stay where they are."""

    strategy = "none"
    axis_name = None  # no collectives

    @functools.cached_property
    def replicated(self):
        return jax.sharding.SingleDeviceSharding(self.devices[0])

    @property
    def rows(self):
        return self.replicated

    def sharding(self, axis: int | None):
        return self.replicated

    def describe(self) -> str:
        return f"one {self.devices[0].platform} device"

    def one_device(self, message=None, log=None) -> "Plan":
        return self

    def _put(self, x, sharding):
        if isinstance(x, jax.Array):
            return _whole(x, self.devices[0])
        return jax.device_put(x, self.devices[0])

    def place_state(self, state):
        return state

    def place_params(self, params):
        return self.place(params, self.replicated)  # whole arrays on the one device

    def feed_batch(self, local: np.ndarray, axis: int = 1) -> jax.Array:
        return jax.device_put(local, self.devices[0])

    def place_carry(self, carry):
        return carry

    def map(self, body, in_axes, out_axes, donate_argnums=()):
        return jax.jit(body, donate_argnums=donate_argnums)

    def map_step(self, step):
        return step  # the jitted step itself: the plain single-device program


class MeshPlan(Plan):
    """`jax.jit` of `shard_map` over the `[data, model]` mesh, values as global arrays.

    `map`'s axis entries: `None` places each leaf by `spec` (replicated, or split by
    the rules where it is a vocabulary-sized parameter), an int `k` splits batch
    columns on axis `k` over `data`, a PartitionSpec (or a tree of them, `specs`) is
    used as given. Outputs: `None` is replicated. The body is traced with the
    vocabulary split over `vocab_axis` (`collectives.splitting_vocab`).
    """

    strategy = "mesh"

    def _in_specs(self, axes, arg):
        def one(ax, sub):
            if isinstance(ax, P):
                return ax
            if ax is None:
                return self.specs(sub)
            return _spec(ax)
        return jax.tree_util.tree_map(one, axes, arg, is_leaf=_is_axis)

    def _out_spec(self, ax):
        return ax if isinstance(ax, (P, Like)) else _spec(ax)

    def shard(self, body, in_specs, out_specs):
        """`shard_map(body)` over this plan's mesh, traced with its vocabulary split."""
        axis = self.vocab_axis

        def in_context(*args):
            with collectives.splitting_vocab(axis):
                return body(*args)
        return shard_map(in_context, mesh=self.mesh, in_specs=in_specs, out_specs=out_specs)

    def map(self, body, in_axes, out_axes, donate_argnums=()):
        programs: dict = {}

        def feed(x, axis):
            if not isinstance(axis, int) or isinstance(x, jax.Array):
                return x
            return self.global_batch(np.asarray(x), axis)

        def program(args):
            args = tuple(_each(ax, a, feed) for ax, a in zip(in_axes, args))
            key = jax.tree_util.tree_structure(args)
            if key not in programs:
                in_specs = tuple(self._in_specs(ax, a) for ax, a in zip(in_axes, args))
                out_specs = jax.tree_util.tree_map(
                    lambda ax: in_specs[ax.index] if isinstance(ax, Like)
                    else self._out_spec(ax), out_axes, is_leaf=_is_axis)
                out_shardings = jax.tree_util.tree_map(
                    lambda sp: NamedSharding(self.mesh, sp), out_specs, is_leaf=_is_spec)
                programs[key] = jax.jit(self.shard(body, in_specs, out_specs),
                                        donate_argnums=donate_argnums,
                                        out_shardings=out_shardings)
            return programs[key], args

        def run(*args):
            jitted, args = program(args)
            return jitted(*args)

        def lower(*args):
            """`jax.jit(...).lower` of the program, as on one device; its `.compile()`
            takes global arrays (host batches placed first: `feed_batch`)."""
            jitted, args = program(args)
            return jitted.lower(*args)
        run.lower = lower
        return run

    def map_step(self, step):
        return MeshStep(self, step)


class MappedStep:
    """A train step over several devices: `(state, inputs, targets, length, seq_len,
    lr) -> (state, metrics)` with `state` in the global layout and `inputs`, `targets`
    this process's columns `[T, B_local]`. `tx`, `traces` and `n_groups` are the
    wrapped step's; a subclass defines `__call__` (`MeshStep`)."""

    def __init__(self, plan: Plan, step):
        if step.axis_name != plan.axis_name:
            raise ValueError(f"the per-device step must use axis_name={plan.axis_name!r}")
        self.plan, self.step = plan, step
        self._run = None

    @property
    def tx(self):
        return self.step.tx

    @property
    def traces(self) -> int:
        return self.step.traces

    @property
    def n_groups(self) -> int:
        return self.step.n_groups


class MeshStep(MappedStep):
    """A train step over a mesh: the gradients of each device's columns in a
    `shard_map` body (averaged over `data`; each `model` shard holding its block of
    the vocabulary), then the optimiser's update in the same jitted program on the
    global arrays, where XLA partitions it (so the clipping norm and the optimiser's
    state see whole, possibly split, parameters)."""

    def __call__(self, state, inputs, targets, length, seq_len, lr):
        plan, step = self.plan, self.step
        state = plan.place_state(state)
        if self._run is None:
            specs = plan.specs(state)
            gradients = plan.shard(step.gradients,
                                   in_specs=(specs, _spec(1), _spec(1), P()),
                                   out_specs=(specs.params, P(), P(), specs.carry))

            def whole(state, inputs, targets, length, seq_len, lr):
                grads, loss, nll, carry = gradients(state, inputs, targets, length)
                return step.update(state, grads, loss, nll, carry, seq_len, lr)
            self._run = jax.jit(whole, donate_argnums=0,
                                out_shardings=(plan.layout(state), plan.replicated))
        if not isinstance(inputs, jax.Array):
            inputs, targets = plan.global_batch(inputs), plan.global_batch(targets)
        return self._run(state, inputs, targets, length, seq_len, lr)


# The placement strategies, `parallel.strategy` -> its Plan (config.py lists these names).
STRATEGIES: dict[str, type[Plan]] = {"mesh": MeshPlan, "none": OneDevice}


def _check_strategy(strategy: str) -> None:
    if strategy == "pmap":
        raise ConfigError("parallel.strategy=pmap was removed: the mesh strategy (the "
                          "default) computes the same numbers with jit + shard_map; "
                          "use --config.parallel.strategy=mesh")
    if strategy not in STRATEGIES:
        raise ConfigError(f"parallel.strategy must be one of {', '.join(STRATEGIES)}, got "
                          f"{strategy!r}")


def mesh_sizes(n_devices: int, data: int = -1, model: int = 1) -> tuple[int, int]:
    """`(data, model)` devices of a mesh over `n_devices` (`parallel.mesh`; -1: what
    the other axis leaves); a ConfigError naming the valid sizes otherwise."""
    if model < 1:
        raise ConfigError(f"parallel.mesh.model must be at least 1, got {model}")
    if data == -1:
        if n_devices % model:
            raise ConfigError(
                f"parallel.mesh.model={model} does not divide the {n_devices} devices: "
                f"use one of {', '.join(map(str, _divisors(n_devices, n_devices)))}")
        data = n_devices // model
    if data < 1 or data * model != n_devices:
        raise ConfigError(
            f"parallel.mesh data={data} x model={model} is {data * model} devices, but "
            f"the run has {n_devices}: set --config.parallel.mesh.data=-1 (the devices "
            f"left) or sizes whose product is {n_devices}")
    return data, model


def rule_axes(logical: str) -> tuple[str, ...]:
    """The values `parallel.rules.<logical>` may take ("" replicated): batch columns
    only on the data axis; the vocabulary on `model` or replicated (never on the data
    axis, whose shards hold different columns); any other name on any mesh axis."""
    return {"batch": (AXIS,), "vocab": (MODEL_AXIS, "")}.get(logical, ("", *MESH_AXES))


def _rules(rules) -> tuple:
    """`parallel.rules` (a mapping or pairs) as checked `(logical, mesh axis)` pairs."""
    pairs = tuple(sorted(dict(rules).items())) if rules is not None else DEFAULT_RULES
    for logical, axis in pairs:
        if axis not in ("", *MESH_AXES):
            raise ConfigError(f"parallel.rules.{logical}={axis!r}: a rule maps a logical "
                              f"axis to one of the mesh axes {', '.join(MESH_AXES)} or "
                              "\"\" (replicated)")
    mapped = dict(pairs)
    if mapped.get("batch", AXIS) != AXIS:
        raise ConfigError("parallel.rules.batch must be \"data\": batch columns are what "
                          "the data axis splits")
    if mapped.get("vocab", MODEL_AXIS) == AXIS:
        # the heads' collectives over the vocabulary's axis take every shard to hold the
        # same columns; the data axis gives each its own
        raise ConfigError(f"parallel.rules.vocab={AXIS!r}: the vocabulary splits over "
                          f"\"{MODEL_AXIS}\" or is replicated (\"\"), not over the data "
                          "axis that splits batch columns")
    return pairs


def make_plan(strategy: str, devices, model_size: int = 1, rules=None) -> Plan:
    """The plan of `strategy` over `devices` (one device: always `OneDevice`), with
    `model_size` devices along the `model` mesh axis."""
    _check_strategy(strategy)
    devices = tuple(devices)
    rules = _rules(rules)
    mesh_sizes(len(devices), -1, model_size)
    if len(devices) == 1:
        return OneDevice(devices, 1, rules)
    if strategy == "none":
        raise ConfigError("parallel.strategy=none runs on one device: give one device, or "
                          "use mesh")
    return STRATEGIES[strategy](devices, model_size, rules)


@functools.lru_cache(maxsize=8)
def _plan(strategy: str, num_devices: int, address: str, num_processes: int,
          process_id: int, join: bool = True, mesh: tuple = (-1, 1),
          rules: tuple | None = None) -> Plan:
    _check_strategy(strategy)
    multi = join and initialize_distributed(address, num_processes, process_id)
    if num_devices < 0:
        raise ConfigError(f"parallel.num_devices must be 0 (all) or positive, got {num_devices}")
    local = sorted(jax.local_devices(), key=lambda d: d.id)
    n_local = num_devices or len(local)
    if n_local > len(local):
        raise ConfigError(
            f"asked for {num_devices} devices (parallel.num_devices) but this process has "
            f"{len(local)} {local[0].platform} device{'s' if len(local) > 1 else ''}: use "
            f"at most {len(local)}, or 0 for all")
    model = mesh[1]
    if strategy == "none":
        if multi and jax.process_count() > 1:
            raise ConfigError("parallel.strategy=none runs on one device, but this is a "
                              f"{jax.process_count()}-process run: use mesh")
        return OneDevice((_default_device(),), 1, _rules(rules))
    if not multi or jax.process_count() == 1:
        mesh_sizes(n_local, *mesh)
        if n_local == 1:
            return OneDevice((_default_device(),), 1, _rules(rules))  # the plain path
        return make_plan(strategy, local[:n_local], model, rules)
    by_process: dict[int, list] = {}
    for d in jax.devices():
        by_process.setdefault(d.process_index, []).append(d)
    counts = {p: len(ds) for p, ds in by_process.items()}
    if len(set(counts.values())) > 1 and not num_devices:
        raise ConfigError(f"processes have different device counts {counts}: set "
                          "--config.parallel.num_devices to one that all have")
    if n_local % model:
        raise ConfigError(f"parallel.mesh.model={model} must divide the {n_local} devices "
                          "of each process (a model group lies within one host)")
    devices = tuple(d for p in sorted(by_process)
                    for d in sorted(by_process[p], key=lambda d: d.id)[:n_local])
    mesh_sizes(len(devices), *mesh)
    return make_plan(strategy, devices, model, rules)


def from_config(config) -> Plan:
    """The plan of `config.parallel`, joining a multi-process run where configured.

    One device in one process (also with `strategy="none"`, or a config without a
    `parallel` section) is a `OneDevice` plan: the plain jitted code path. Cached, so
    every part of a run gets the same plan.
    """
    p = config.get("parallel") if hasattr(config, "get") else None
    get = (lambda k, d: p.get(k, d)) if p is not None else (lambda k, d: d)
    mesh = get("mesh", None)
    sizes = (int(mesh.get("data", -1)), int(mesh.get("model", 1))) if mesh else (-1, 1)
    rules = get("rules", None)
    rules = tuple(sorted(dict(rules).items())) if rules else None
    return _plan(str(get("strategy", "mesh")), int(get("num_devices", 0)),
                 str(get("coordinator_address", "")), int(get("num_processes", 0)),
                 int(get("process_id", -1)), True, sizes, rules)


def local_plan(num_devices: int = 0, strategy: str = "mesh", model: int = 1,
               rules=None) -> Plan:
    """A plan over this process's first `num_devices` devices (0: all) alone, for work
    that one process does by itself (the `evaluate` command), `model` of them along
    the `model` mesh axis."""
    rules = tuple(sorted(dict(rules).items())) if rules else None
    return _plan(strategy, num_devices, "", 0, -1, False, (-1, model), rules)


def resolve(plan: Plan | None) -> Plan:
    """`plan`, or this process's default device alone when not given (the default of
    the evaluation functions' `plan` argument)."""
    return local_plan(1, "none") if plan is None else plan
