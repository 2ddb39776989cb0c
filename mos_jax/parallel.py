"""Data parallelism over every local device and across hosts.

The batch columns (the independent streams of `batchify`) are split into equal,
contiguous blocks, one per device; each device keeps the recurrent carry of its own
columns. One per-device step (`TrainStep.per_device_step` with `axis_name=AXIS`) runs
two ways, chosen by `config.parallel.strategy`:

- `mesh` (default): `jax.jit` of `jax.shard_map` over a one-axis `Mesh`; arrays are
  global `jax.Array`s with `NamedSharding`s (replicated parameters, column-sharded
  carry and batches).
- `pmap`: `jax.pmap` over the same devices (the carry and batches mapped over their
  device blocks, the rest broadcast with `in_axes=None`).

Gradient averaging. The body computes the gradient of its own columns' mean loss and
`lax.pmean`s it over `AXIS` before the update, so every device applies the same update,
equal to the single-device update of the whole batch (every device holds the same
number of columns, so the mean of the per-device means is the global mean). Both ways
run the body with no varying-axis checking (`shard_map(..., check_vma=False)`, which is
also how `jax.pmap` is built on `shard_map`): with the check on, `grad` with respect to
replicated (axis-invariant) parameters returns the gradient already *summed* over the
axis, and the explicit `pmean` would then give `n_devices` times the mean gradient.
The tests check the gradient against one device's, so a factor of `n_devices` fails.

Dropout keys fold in `lax.axis_index(AXIS)` (see `TrainStep`): masks differ per
device and are reproducible for a given device count; results change with the device
count only where dropout is on.

Layouts. Whatever the strategy, the training loop holds its `TrainState` in one global
layout: every leaf a global array over the mesh, replicated except the carry, which is
`[B, H]` sharded by rows (columns of the batch). That is also the checkpoint layout,
so a checkpoint restores under either strategy, any device count that divides the
batch, or one device.

Multi-host. `from_config` joins a multi-process run (`jax.distributed.initialize`) from
`config.parallel` or the environment. Devices are ordered process by process, so host
`p` holds one contiguous block of columns and reads only those (`local_columns`).
Every process calls the checkpoint functions (Orbax writes each array's shards from
the process that holds them and the rest from process 0); only process 0 writes logs
and metrics (the callers check `is_primary`). Decisions that depend on a clock or a
signal (time-based checkpoints, the time budget, Ctrl-C) are agreed between processes
(`agree`) at logging steps, so that all take the same branch at the same step.

Global batch sizes must divide by the number of devices (`check_divisible` names the
nearest valid sizes). Evaluation splits its columns too (`token_logprobs`); a batch
that does not divide (the test batch of 1, say) is scored on one device instead.
Dynamic evaluation's update pass (batch 1) stays on one device; its gradient
statistics pass (batch 100) splits its columns (`gradient_statistics`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import sys
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mos_jax import dynamic_eval as de
from mos_jax import evaluate
from mos_jax import model as model_lib
from mos_jax.batching import batchify, eval_windows, padded_window
from mos_jax.errors import ConfigError
from mos_jax.model import ModelConfig, Params

AXIS = "data"  # the one mesh axis; also the collectives' axis name
STRATEGIES = ("mesh", "pmap", "none")
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
                    local_devices: int | None = None) -> int:
    """Columns per device; a `ConfigError` naming the nearest valid sizes otherwise."""
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
        f"{key}={batch_size} does not split over {n_devices} devices (the columns are "
        f"divided equally): use a multiple of {n_devices}, the nearest being {sizes} "
        f"(--config.{key}=...){hint}")


def groups_per_device(batch_size: int, small_batch_size: int, n_devices: int) -> int:
    """Gradient-accumulation groups within one device's columns.

    `small_batch_size` caps the columns a group holds (-1: no cap). A device with at
    most that many columns needs no accumulation; otherwise the cap must divide its
    columns.
    """
    per_device = batch_size // n_devices
    if small_batch_size in (-1, 0) or small_batch_size >= per_device:
        return 1
    if small_batch_size < 0 or per_device % small_batch_size:
        divisors = [d for d in range(1, per_device + 1) if per_device % d == 0]
        raise ConfigError(
            f"data.small_batch_size={small_batch_size} must divide the {per_device} "
            f"columns each device holds (data.batch_size={batch_size} over {n_devices} "
            f"devices): use one of {divisors}, or -1 for no accumulation")
    return per_device // small_batch_size


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


def _state_prefix(state, carry_leaf, other_leaf):
    """A prefix of a TrainState-like struct: `carry_leaf` for `carry`, `other_leaf` for
    every other field."""
    fields = {f.name: other_leaf for f in dataclasses.fields(state)}
    fields["carry"] = carry_leaf
    return state.replace(**fields)


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
class DataParallel:
    """Which devices take part, and how: the strategy and the global device order.

    `devices` lists every participating device of every process, process by process;
    every process uses the same number of its own devices. Hashable, so compiled
    functions are cached per plan.
    """

    strategy: str  # "mesh" or "pmap"
    devices: tuple

    def __post_init__(self):
        if self.strategy not in ("mesh", "pmap"):
            raise ConfigError(f"parallel.strategy must be one of {STRATEGIES}, got "
                              f"{self.strategy!r}")

    # -- topology
    @functools.cached_property
    def mesh(self) -> Mesh:
        return Mesh(np.array(self.devices, dtype=object), (AXIS,))

    @property
    def n_devices(self) -> int:
        return len(self.devices)

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
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, P())

    @functools.cached_property
    def rows(self) -> NamedSharding:
        """Leading axis split over devices (the carry `[B, H]`)."""
        return NamedSharding(self.mesh, P(AXIS))

    @functools.cached_property
    def columns(self) -> NamedSharding:
        """Second axis split over devices (batches `[T, B]`)."""
        return NamedSharding(self.mesh, P(None, AXIS))

    def describe(self) -> str:
        procs = (f" in {self.process_count} processes ({self.n_local} each)"
                 if self.process_count > 1 else "")
        return (f"data parallel ({self.strategy}) over {self.n_devices} "
                f"{self.devices[0].platform} devices{procs}")

    # -- columns
    def per_device(self, batch_size: int, key: str = "data.batch_size") -> int:
        local = len(jax.local_devices()) if self.process_count == 1 else None
        return check_divisible(batch_size, self.n_devices, key, local)

    def divides(self, batch_size: int) -> bool:
        return batch_size >= self.n_devices and batch_size % self.n_devices == 0

    def host_slice(self, batch_size: int) -> slice:
        """The columns this process holds (one contiguous block)."""
        per_host = self.per_device(batch_size) * self.n_local
        start = self.process_index * per_host
        return slice(start, start + per_host)

    def local_columns(self, rows: np.ndarray) -> np.ndarray:
        """`rows[..., host_slice]`: this process's share of a batchified `[n, B]`."""
        return rows[..., self.host_slice(rows.shape[-1])]

    # -- placement
    def _put(self, x, sharding: NamedSharding):
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
        """A TrainState in the global layout: carry split by rows, the rest replicated."""
        return self.place(state, _state_prefix(state, self.rows, self.replicated))

    def abstract(self, tree):
        """`ShapeDtypeStruct`s with the global layout's shardings, to restore into
        (leaves under a `carry` key split by rows, the rest replicated)."""
        return jax.tree_util.tree_map_with_path(
            lambda path, x: jax.ShapeDtypeStruct(
                x.shape, x.dtype, sharding=self.rows if _is_sharded(path) else self.replicated),
            tree)

    def zero_carry(self, model_config: ModelConfig, batch_size: int):
        """A zero carry in the strategy's layout: `[B, H]` split by rows (mesh), or
        `[n_devices, B / n_devices, H]` split by its first axis (pmap)."""
        carry = model_lib.init_carry(model_config, batch_size)
        if self.strategy == "mesh":
            return self.place(carry, self.rows)
        n = self.n_devices
        carry = jax.tree_util.tree_map(
            lambda x: np.zeros((n, batch_size // n, x.shape[-1]), x.dtype), carry)
        return self.place(carry, self.rows)

    def global_batch(self, local: np.ndarray, axis: int = 1) -> jax.Array:
        """A global array from this process's columns (split over `axis`)."""
        spec = [None] * local.ndim
        spec[axis] = AXIS
        shape = list(local.shape)
        shape[axis] *= self.process_count
        return jax.make_array_from_process_local_data(
            NamedSharding(self.mesh, P(*spec)), local, tuple(shape))

    def local_copy(self, tree):
        """Replicated global arrays as single-device arrays on this process's first
        device (for work that runs on one device)."""
        def one(x):
            if isinstance(x, jax.Array) and len(x.sharding.device_set) > 1:
                return x.addressable_data(0)
            return x
        return jax.tree_util.tree_map(one, tree)

    def gather_columns(self, local: np.ndarray) -> np.ndarray:
        """`[n, B_local]` of every process -> the whole `[n, B]` on every process."""
        if self.process_count == 1:
            return local
        from jax.experimental import multihost_utils
        return np.asarray(multihost_utils.process_allgather(
            np.ascontiguousarray(local.T), tiled=True)).T

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

    def note_evaluation(self, batch_sizes, log: Callable[[str], None] | None) -> None:
        """Say, once, which evaluation batch sizes run on one device."""
        for batch_size in sorted(set(batch_sizes)):
            if not self.divides(batch_size):
                where = " (in every process)" if self.process_count > 1 else ""
                self.note(f"evaluation with batch size {batch_size} does not split over "
                          f"{self.n_devices} devices: it runs on one device{where}", log)

    def note(self, message: str, log: Callable[[str], None] | None) -> None:
        """Say `message` once per plan (process 0 only)."""
        if message in self._notes or not self.is_primary:
            return
        self._notes.add(message)
        (log or _stderr)(message)

    @functools.cached_property
    def _notes(self) -> set:
        return set()


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@functools.lru_cache(maxsize=8)
def _plan(strategy: str, num_devices: int, address: str, num_processes: int,
          process_id: int, join: bool = True) -> DataParallel | None:
    if strategy not in STRATEGIES:
        raise ConfigError(f"parallel.strategy must be one of {', '.join(STRATEGIES)}, got "
                          f"{strategy!r}")
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
    if strategy == "none":
        if multi and jax.process_count() > 1:
            raise ConfigError("parallel.strategy=none runs on one device, but this is a "
                              f"{jax.process_count()}-process run: use mesh or pmap")
        return None
    if not multi or jax.process_count() == 1:
        if n_local == 1:
            return None  # one device: the plain jitted code path
        return DataParallel(strategy, tuple(local[:n_local]))
    by_process: dict[int, list] = {}
    for d in jax.devices():
        by_process.setdefault(d.process_index, []).append(d)
    counts = {p: len(ds) for p, ds in by_process.items()}
    if len(set(counts.values())) > 1 and not num_devices:
        raise ConfigError(f"processes have different device counts {counts}: set "
                          "--config.parallel.num_devices to one that all have")
    devices = tuple(d for p in sorted(by_process)
                    for d in sorted(by_process[p], key=lambda d: d.id)[:n_local])
    return DataParallel(strategy, devices)


def from_config(config) -> DataParallel | None:
    """The plan of `config.parallel`, joining a multi-process run where configured.

    None means one device in one process: the plain single-device code path (also
    with `strategy="none"`, or a config without a `parallel` section). Cached, so every
    part of a run gets the same plan.
    """
    p = config.get("parallel") if hasattr(config, "get") else None
    get = (lambda k, d: p.get(k, d)) if p is not None else (lambda k, d: d)
    return _plan(str(get("strategy", "mesh")), int(get("num_devices", 0)),
                 str(get("coordinator_address", "")), int(get("num_processes", 0)),
                 int(get("process_id", -1)))


def local_plan(num_devices: int = 0, strategy: str = "mesh") -> DataParallel | None:
    """A plan over this process's first `num_devices` devices (0: all) alone, for work
    that one process does by itself (the `evaluate` command); None for one device."""
    return _plan(strategy, num_devices, "", 0, -1, join=False)


# ------------------------------------------------------------------------ training

def restore_target(plan: DataParallel | None, abstract):
    """`abstract` (`ShapeDtypeStruct`s) with the shardings to restore a checkpoint
    into: the plan's global layout, or this process's default device. Orbax then
    restores checkpoints written under any strategy or device count."""
    if plan is not None:
        return plan.abstract(abstract)
    device = jax.config.jax_default_device
    if not isinstance(device, jax.Device):
        device = jax.local_devices()[0]
    sharding = jax.sharding.SingleDeviceSharding(device)
    return jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), abstract)


class ParallelTrainStep:
    """`TrainStep`'s interface over several devices.

    `(state, inputs, targets, length, seq_len, lr) -> (state, metrics)` with `state` in
    the global layout and `inputs`, `targets` this process's columns `[T, B_local]`.
    `tx` and `traces` are the wrapped step's.
    """

    def __init__(self, plan: DataParallel, step, batch_size: int):
        if step.axis_name != AXIS:
            raise ValueError(f"the per-device step must use axis_name={AXIS!r}")
        self.plan, self.step, self.batch_size = plan, step, batch_size
        self.per_device = plan.per_device(batch_size)
        self._run = None

    @property
    def tx(self):
        return self.step.tx

    @property
    def traces(self) -> int:
        return self.step.traces

    def __call__(self, state, inputs, targets, length, seq_len, lr):
        state = self.plan.place_state(state)
        if self._run is None:
            self._run = (self._build_mesh if self.plan.strategy == "mesh"
                         else self._build_pmap)(state)
        return self._run(state, np.asarray(inputs), np.asarray(targets), length, seq_len, lr)

    def _build_mesh(self, state):
        plan = self.plan
        specs = _state_prefix(state, P(AXIS), P())
        mapped = shard_map(
            self.step.per_device_step, mesh=plan.mesh,
            in_specs=(specs, P(None, AXIS), P(None, AXIS), P(), P(), P()),
            out_specs=(specs, P()))
        jitted = jax.jit(mapped, donate_argnums=0, out_shardings=(
            _state_prefix(state, plan.rows, plan.replicated), plan.replicated))

        def run(state, inputs, targets, length, seq_len, lr):
            return jitted(state, plan.global_batch(inputs), plan.global_batch(targets),
                          length, seq_len, lr)
        return run

    def _build_pmap(self, state):
        plan = self.plan
        axes = _state_prefix(state, 0, None)
        mapped = jax.pmap(self.step.per_device_step, axis_name=AXIS,
                          in_axes=(axes, 1, 1, None, None, None), out_axes=(axes, None),
                          devices=plan.devices, donate_argnums=0)
        n, b = plan.n_devices, self.per_device
        stacked = NamedSharding(plan.mesh, P(AXIS))
        stack = jax.jit(lambda c: jax.tree_util.tree_map(
            lambda x: x.reshape(n, b, x.shape[-1]), c), out_shardings=stacked,
            donate_argnums=0)
        unstack = jax.jit(lambda c: jax.tree_util.tree_map(
            lambda x: x.reshape(n * b, x.shape[-1]), c), out_shardings=plan.rows,
            donate_argnums=0)

        def run(state, inputs, targets, length, seq_len, lr):
            steps = inputs.shape[0]
            state = state.replace(carry=stack(state.carry))
            new, metrics = mapped(state, inputs.reshape(steps, plan.n_local, b),
                                  targets.reshape(steps, plan.n_local, b), length,
                                  seq_len, lr)
            if plan.process_count > 1:  # pmap returns this process's part
                from jax.experimental import multihost_utils
                new = multihost_utils.host_local_array_to_global_array(
                    new, plan.mesh, _state_prefix(new, P(AXIS), P()))
            return new.replace(carry=unstack(new.carry)), metrics
        return run


@functools.lru_cache(maxsize=16)
def make_train_step(plan: DataParallel, step_class, model_config: ModelConfig, *,
                    alpha: float, beta: float, bptt: int, batch_size: int,
                    small_batch_size: int, seed: int, clip: float,
                    wdecay: float, optimizer=None) -> ParallelTrainStep:
    """A `ParallelTrainStep` around `step_class` (`mos_jax.train.TrainStep`), shared
    by runs with the same arguments (and so compiled once)."""
    plan.per_device(batch_size)
    groups = groups_per_device(batch_size, small_batch_size, plan.n_devices)
    step = step_class(model_config, alpha=alpha, beta=beta, bptt=bptt, n_groups=groups,
                      seed=seed, clip=clip, wdecay=wdecay, optimizer=optimizer,
                      axis_name=AXIS)
    return ParallelTrainStep(plan, step, batch_size)


# ---------------------------------------------------------------------- evaluation

@functools.lru_cache(maxsize=16)
def _score_fn(plan: DataParallel, config: ModelConfig):
    body = functools.partial(evaluate.score_window, config)
    if plan.strategy == "mesh":
        return jax.jit(shard_map(
            body, mesh=plan.mesh,
            in_specs=(P(), P(AXIS), P(None, AXIS), P(None, AXIS), P()),
            out_specs=(P(None, AXIS), P(AXIS))), donate_argnums=1,
            out_shardings=(plan.columns, plan.rows))
    return jax.pmap(body, axis_name=AXIS, in_axes=(None, 0, 1, 1, None),
                    out_axes=(1, 0), devices=plan.devices, donate_argnums=1)


def _local_block(plan: DataParallel, x, axis: int = 1) -> np.ndarray:
    """This process's part of a global array split over `axis`, as NumPy."""
    if plan.process_count == 1:
        return np.asarray(x)
    shards = sorted(x.addressable_shards, key=lambda s: s.index[axis].start or 0)
    return np.concatenate([np.asarray(s.data) for s in shards], axis=axis)


def token_logprobs(plan: DataParallel | None, model_config: ModelConfig, params: Params,
                   ids: np.ndarray, batch_size: int, bptt: int,
                   progress: Callable[[int, int], None] | None = None,
                   log: Callable[[str], None] | None = None) -> np.ndarray:
    """`evaluate.token_logprobs` with the columns split over the plan's devices.

    Same result (`[nrows - 1, batch_size]`, on every process). A batch that does not
    split over the devices (batch 1, say) is scored on one device, with a note.
    """
    if plan is None:
        return evaluate.token_logprobs(model_config, params, ids, batch_size, bptt, progress)
    if not plan.divides(batch_size):
        plan.note_evaluation((batch_size,), log)
        return evaluate.token_logprobs(model_config, plan.local_copy(params), ids,
                                       batch_size, bptt, progress)
    rows = batchify(ids, batch_size)
    total = len(rows) - 1
    local = plan.local_columns(rows)
    b = batch_size // plan.n_devices
    params = plan.place(params, plan.replicated)
    score = _score_fn(plan, model_config)
    carry = plan.zero_carry(model_config, batch_size)
    pieces = []
    for start, length in eval_windows(len(rows), bptt):
        inputs, targets, length = padded_window(local, start, length, bptt)
        if plan.strategy == "mesh":
            inputs, targets = plan.global_batch(inputs), plan.global_batch(targets)
        else:
            inputs = inputs.reshape(bptt, plan.n_local, b)
            targets = targets.reshape(bptt, plan.n_local, b)
        logp, carry = score(params, carry, inputs, targets, length)
        pieces.append((logp, length))
        if progress is not None:
            progress(start + length, total)
    if plan.strategy == "mesh":
        out = np.concatenate([_local_block(plan, logp)[:length] for logp, length in pieces])
    else:
        out = np.concatenate([np.asarray(logp)[:length].reshape(length, -1)
                              for logp, length in pieces])
    out = plan.gather_columns(out)
    assert out.shape == (total, batch_size), out.shape
    return out


def perplexity(plan: DataParallel | None, model_config: ModelConfig, params: Params,
               ids: np.ndarray, batch_size: int = 10, bptt: int = 70) -> float:
    logp = token_logprobs(plan, model_config, params, ids, batch_size, bptt)
    return math.exp(-float(np.mean(logp, dtype=np.float64)))


# ---------------------------------------------------------------- dynamic evaluation

def dynamic_eval_note(plan: DataParallel | None, batch_size: int) -> str | None:
    """What dynamic evaluation's update pass runs on, when several devices are there."""
    if plan is None:
        return None
    return (f"dynamic evaluation (batch {batch_size}) updates the weights after every "
            f"window, one stream in sequence: it runs on one device, not the "
            f"{plan.n_devices} available")


@functools.lru_cache(maxsize=8)
def _stats_fn(plan: DataParallel, config: ModelConfig):
    body = functools.partial(de.stats_scan, config, axis_name=AXIS)
    if plan.strategy == "mesh":
        return jax.jit(shard_map(
            body, mesh=plan.mesh,
            in_specs=(P(), P(), P(AXIS), P(None, None, AXIS), P(None, None, AXIS), P()),
            out_specs=(P(), P(AXIS))), donate_argnums=(1, 2),
            out_shardings=(plan.replicated, plan.rows))
    return jax.pmap(body, axis_name=AXIS, in_axes=(None, None, 0, 2, 2, None),
                    out_axes=(None, 0), devices=plan.devices, donate_argnums=(1, 2))


def gradient_statistics(plan: DataParallel | None, model_config: ModelConfig,
                        params: Params, train_ids: np.ndarray, *, lamb: float = 0.02,
                        batch_size: int = 100, bptt: int = 5,
                        max_batches: int | None = None, rms: bool = False,
                        progress: Callable[[int, int], None] | None = None,
                        log: Callable[[str], None] | None = None
                        ) -> de.GradientStatistics:
    """`dynamic_eval.gradient_statistics` with the columns split over the devices.

    Each window's gradient is the `pmean` of the devices' gradients (the gradient of
    the whole window's mean NLL), then squared and summed as on one device. A batch
    that does not split runs on one device, with a note.
    """
    kwargs = dict(lamb=lamb, batch_size=batch_size, bptt=bptt, max_batches=max_batches,
                  rms=rms, progress=progress)
    if plan is None:
        return de.gradient_statistics(model_config, params, train_ids, **kwargs)
    if not plan.divides(batch_size):
        plan.note(f"gradient statistics with batch size {batch_size} do not split over "
                  f"{plan.n_devices} devices: they run on one device", log)
        return de.gradient_statistics(model_config, plan.local_copy(params), train_ids,
                                      **kwargs)
    if lamb <= 0:
        raise ConfigError(f"lamb must be positive (decrate is clipped at 1/lamb), got {lamb}")
    w = de.make_windows(train_ids, batch_size, bptt, max_batches)
    n_real = int((w.lengths > 0).sum())
    inputs, targets = plan.local_columns(w.inputs), plan.local_columns(w.targets)
    b = batch_size // plan.n_devices
    params = plan.place(params, plan.replicated)
    sq_sum = plan.place(jax.tree_util.tree_map(np.zeros_like, plan.local_copy(params)),
                        plan.replicated)
    carry = plan.zero_carry(model_config, batch_size)
    stats = _stats_fn(plan, model_config)
    for start in range(0, len(w.lengths), de.CHUNK):
        sl = slice(start, start + de.CHUNK)
        x, y = inputs[sl], targets[sl]
        if plan.strategy == "mesh":
            x, y = plan.global_batch(x, axis=2), plan.global_batch(y, axis=2)
        else:
            x = x.reshape(*x.shape[:2], plan.n_local, b)
            y = y.reshape(*y.shape[:2], plan.n_local, b)
        sq_sum, carry = stats(params, sq_sum, carry, x, y, w.lengths[sl])
        if progress is not None:
            progress(min(start + de.CHUNK, n_real), n_real)
    sq_sum = plan.local_copy(sq_sum)
    divisor = float(n_real if rms else 1)
    ms = jax.tree_util.tree_map(lambda s: jnp.sqrt(s / divisor), sq_sum)
    return de.GradientStatistics(ms, de.decay_rates(ms, lamb), n_real)
