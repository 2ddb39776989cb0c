"""Training: the jitted train step, the epoch loop with NT-ASGD, finetuning, resume.

`train_and_evaluate(config, workdir)` runs the procedure of docs/reference.md section 3 and
`finetune(config, workdir)` the finetune stage; both share one loop (`_run`), in parts:
`_setup` (the work directory's checks in `mos_jax.runcompat`, corpus, optimiser, step:
the run object `_Run`, with the config's values as `RunSettings`, built once; nothing
after it reads the config), `_restore_or_init`, `_Loop.run_epoch`, `_Loop.end_epoch`
(validate, NT-ASGD switch, best weights, save) and `_finish` (test), with one
`StopPolicy` for Ctrl-C, the time budget, the stop step and the checkpoint cadence.
Both return a dict saying whether the run `finished` and the `reason`. Every
step's randomness derives from the config seed: dropout keys are
`fold_in(key(seed), step)` (then one `fold_in` per column group), window lengths come
from `np.random.default_rng([seed, epoch])`. So the checkpoint needs no RNG state, and
a run interrupted anywhere and resumed produces bit-identical parameters.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import json
import math
import signal
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from mos_jax import config as config_lib
from mos_jax import data as data_lib
from mos_jax import evaluate
from mos_jax import heads
from mos_jax import model as model_lib
from mos_jax import optim
from mos_jax import parallel
from mos_jax import runcompat
from mos_jax import sources
from mos_jax import workdir as workdir_lib
from mos_jax.batching import batchify, default_buckets, padded_window, train_windows
from mos_jax.checkpoint import CheckpointStore
from mos_jax.errors import CheckpointError, ConfigError, DataError, MosJaxError, note
from mos_jax.progress import MetricsWriter, Progress


class TrainingError(MosJaxError):
    """Training cannot go on (a non-finite loss, say)."""


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimiser steps taken
    params: Any
    opt_state: Any  # the optimiser's, with NT-ASGD averaging (optim.AveragedState)
    carry: model_lib.ModelCarry  # one (h, c) per layer, [B, H_l]


def release_free_heap() -> None:
    """Return the C heap's free pages to the OS (glibc `malloc_trim`; else nothing).

    XLA's compiler frees most of what it allocates, but glibc keeps it mapped; trimming
    after a compilation keeps it out of the process's peak memory during the steps.
    """
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


# ------------------------------------------------------------------------ config glue

def model_config_from(config, vocab_size: int) -> model_lib.ModelConfig:
    return model_lib.ModelConfig.from_dict({**config.model.to_dict(),
                                            "vocab_size": vocab_size})


# The one config-to-corpus path lives in `mos_jax.sources`; these names stay here for
# the modules and tests that call them through `train`.
vocab_order = sources.vocab_order
tokenizer_of = sources.tokenizer_of
load_corpus_from = sources.load_corpus_from

# Work-directory compatibility lives in mos_jax.runcompat; its names as this module
# had them.
matching_configs = runcompat.matching_configs
_saved_config = runcompat.saved_config
_config_changes = runcompat.config_changes
_finetune_data = runcompat.finetune_data
_check_vocabulary = runcompat.check_vocabulary


def column_groups(batch_size: int, small_batch_size: int, n_devices: int = 1,
                  over: str | None = None) -> int:
    """Gradient-accumulation groups within one device's columns.

    `small_batch_size` caps the columns a group holds (-1: no cap). A device with at
    most that many columns (`batch_size / n_devices`) needs no accumulation; otherwise
    the cap must divide its columns. `over`: what the columns split over, for the
    message (default "`n_devices` devices"; `Plan.columns_over`).
    """
    per_device = batch_size // n_devices
    if small_batch_size in (-1, 0) or small_batch_size >= per_device:
        return 1
    if small_batch_size < 0 or per_device % small_batch_size:
        divisors = [d for d in range(1, per_device + 1) if per_device % d == 0]
        if n_devices == 1:
            raise ConfigError(
                f"data.small_batch_size={small_batch_size} must divide data.batch_size="
                f"{batch_size}: use one of {divisors} (or -1 for no accumulation)")
        raise ConfigError(
            f"data.small_batch_size={small_batch_size} must divide the {per_device} "
            f"columns each device holds (data.batch_size={batch_size} over "
            f"{over or f'{n_devices} devices'}): use one of {divisors}, or -1 for no "
            "accumulation")
    return per_device // small_batch_size


# -------------------------------------------------------------------------- the step

class TrainStep:
    """The jitted train step `(state, inputs, targets, length, seq_len, lr) -> (state, m)`.

    `inputs`, `targets`: [T, B] (T a bucket; the first `length` rows are real). The
    batch columns form `n_groups` contiguous groups, each with its own carry and dropout
    masks; their gradients are accumulated, each weighted by its share of the batch
    (1 / n_groups). Then the optimiser's Optax transformation (`optimizer`, an
    `optim.Optimizer`, wrapped in NT-ASGD averaging: `tx`) at the learning rate
    `lr * seq_len / bptt` (times the schedule, if any, at the count in its state); the
    average takes in the new iterate. The metrics hold the learning rate applied
    (`lr`). `length`, `seq_len` and `lr` are traced, so only a new bucket T compiles a
    new program; `traces` counts the programs compiled. `state` is donated.

    With `axis_name`, `gradients` is the body of a data-parallel step (mapped by a
    placement plan over that axis, `update` then run on the global arrays; see
    `mos_jax.parallel.MeshStep` and `build_train_step`): each device's dropout keys
    fold in its axis index, and gradients and metrics are averaged over the axis
    before the (then identical) update.
    """

    def __init__(self, model_config: model_lib.ModelConfig, *, alpha: float, beta: float,
                 bptt: int, n_groups: int, seed: int, optimizer: optim.Optimizer,
                 axis_name: str | None = None):
        self.optimizer = optimizer
        self.tx = optimizer.transform(averaging=True)
        self.traces = 0
        self.model_config, self.alpha, self.beta = model_config, alpha, beta
        self.bptt, self.n_groups, self.seed = bptt, n_groups, seed
        self.axis_name = axis_name
        self._jitted = jax.jit(self._step, donate_argnums=0)
        self._compiled: dict = {}

    def __call__(self, state, inputs, targets, length, seq_len, lr):
        # Compiled ahead of time, one program per window shape, so that the heap the
        # compiler freed goes back to the OS before the first step allocates its own.
        scalars = (jnp.asarray(length, jnp.int32), jnp.asarray(seq_len, jnp.int32),
                   jnp.asarray(lr, jnp.float32))
        key = (inputs.shape, targets.shape)
        if key not in self._compiled:
            self._compiled[key] = self._jitted.lower(
                state, inputs, targets, *scalars).compile()
            release_free_heap()
        return self._compiled[key](state, inputs, targets, *scalars)

    def compiled(self, shape: tuple[int, int]):
        """The compiled program for windows of `shape` `[T, B]` (None before a call)."""
        return self._compiled.get((tuple(shape), tuple(shape)))

    def _loss(self, params, inputs, targets, carry, rng, length):
        return model_lib.regularized_loss(self.model_config, params, inputs, targets,
                                          carry, self.alpha, self.beta, rng=rng,
                                          length=length)

    def _step(self, state: TrainState, inputs, targets, length, seq_len, lr):
        return self.update(state, *self.gradients(state, inputs, targets, length),
                           seq_len, lr)

    def gradients(self, state: TrainState, inputs, targets, length):
        """`(grads, loss, nll, carry)` of one step's columns (averaged over the data
        axis in a data-parallel body): the part of the step that reads the batch."""
        self.traces += 1  # runs once per compilation
        n_groups = self.n_groups
        steps, batch = inputs.shape
        b = batch // n_groups
        step_key = jax.random.fold_in(jax.random.key(self.seed), state.step)
        if self.axis_name is not None:
            step_key = jax.random.fold_in(step_key, jax.lax.axis_index(self.axis_name))

        def split(x):  # [..., B, F] -> [G, ..., b, F] with contiguous column groups
            return jnp.moveaxis(x.reshape(*x.shape[:-2], n_groups, b, x.shape[-1]), -3, 0)

        grouped_in = jnp.moveaxis(inputs.reshape(steps, n_groups, b), 1, 0)
        grouped_tg = jnp.moveaxis(targets.reshape(steps, n_groups, b), 1, 0)
        grouped_carry = jax.tree_util.tree_map(split, state.carry)

        def group(grads, xs):
            g, inp, tgt, carry = xs
            (loss, aux), g_grads = jax.value_and_grad(self._loss, has_aux=True)(
                state.params, inp, tgt, carry, jax.random.fold_in(step_key, g), length)
            grads = jax.tree_util.tree_map(lambda a, x: a + x / n_groups, grads, g_grads)
            return grads, (loss, aux["nll"], jax.lax.stop_gradient(aux["carry"]))

        if n_groups == 1:  # no accumulator: one set of gradients alive, not two
            (loss, aux), grads = jax.value_and_grad(self._loss, has_aux=True)(
                state.params, inputs, targets, state.carry, jax.random.fold_in(step_key, 0),
                length)
            losses, nlls = loss[None], aux["nll"][None]
            carries = jax.tree_util.tree_map(lambda x: jax.lax.stop_gradient(x)[None],
                                             aux["carry"])
        else:
            zeros = jax.tree_util.tree_map(jnp.zeros_like, state.params)
            grads, (losses, nlls, carries) = jax.lax.scan(
                group, zeros, (jnp.arange(n_groups), grouped_in, grouped_tg, grouped_carry))
        losses, nlls = jnp.mean(losses), jnp.mean(nlls)
        if self.axis_name is not None:  # every device holds an equal share of columns
            grads, losses, nlls = jax.lax.pmean((grads, losses, nlls), self.axis_name)
        carry = jax.tree_util.tree_map(lambda x: x.reshape(batch, x.shape[-1]), carries)
        return grads, losses, nlls, carry

    def update(self, state: TrainState, grads, losses, nlls, carry, seq_len, lr):
        """The optimiser's update from `gradients`' results: the new state and the
        metrics. Element-wise but for the clipping norm, so it runs the same on one
        device, in a data-parallel body, or on parameters split over devices."""
        lr_t = lr * seq_len / self.bptt
        updates, opt_state = self.tx.update(grads, state.opt_state, state.params,
                                            learning_rate=lr_t)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": losses, "nll": nlls,
                   "grad_norm": optax.tree.norm(grads),
                   "lr": self.optimizer.learning_rate(opt_state, lr_t)}
        return TrainState(state.step + 1, params, opt_state, carry), metrics


def check_placement(plan: parallel.Plan, model_config: model_lib.ModelConfig,
                    trained: bool = False) -> None:
    """ConfigError (one line, before any compile) when `plan` splits the vocabulary
    and the model cannot: a head without `shards_vocab`, or a vocabulary that does not
    divide into the model axis's blocks."""
    if plan.vocab_axis is None:
        return
    if not heads.get_head(model_config.head).shards_vocab:
        raise ConfigError(heads.sharding_refusal(model_config.head))
    plan.check_vocab(model_config.padded_vocab_size, words=model_config.vocab_size,
                     trained=trained)


def build_train_step(config, model_config: model_lib.ModelConfig, plan: parallel.Plan,
                     *, batch_size: int = 0, bptt: int = 0, seed: int | None = None,
                     optimizer: optim.Optimizer | None = None):
    """The train step of `config` over `plan`'s devices: the one way to build it.

    `(state, inputs, targets, length, seq_len, lr) -> (state, metrics)`, with `inputs`
    and `targets` this process's columns `[T, B_local]`; `tx` and `traces` as
    `TrainStep`'s. On one device it is the `TrainStep` itself. `batch_size`, `bptt`
    and `seed` override the config's (0 / None: the config's); `optimizer` is the
    config's `optim.from_config(config.optim)` (None: built here). Shared by runs with
    the same arguments (and so compiled once).
    """
    d, o = config.data, config.optim
    batch_size = batch_size or d.batch_size
    plan.per_device(batch_size)
    check_placement(plan, model_config)
    n_groups = column_groups(batch_size, d.small_batch_size, plan.n_data,
                             plan.columns_over())
    return _train_step(plan, model_config, alpha=o.alpha, beta=o.beta, bptt=bptt or d.bptt,
                       n_groups=n_groups, seed=config.train.seed if seed is None else seed,
                       optimizer=optim.from_config(o) if optimizer is None else optimizer)


@functools.lru_cache(maxsize=16)
def _train_step(plan: parallel.Plan, model_config: model_lib.ModelConfig, **kwargs):
    return plan.map_step(TrainStep(model_config, axis_name=plan.axis_name, **kwargs))


def init_state(model_config: model_lib.ModelConfig, params, batch_size: int,
               tx: optax.GradientTransformation, averaging_active: bool = False
               ) -> TrainState:
    """A new TrainState; `tx` the step's transformation (with averaging: `step.tx`,
    `Optimizer.transform(averaging=True)`), averaging on from the start when
    `averaging_active` (a finetune)."""
    opt_state = tx.init(params)
    if averaging_active:
        opt_state = optim.switch_on(opt_state)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state,
                      carry=model_lib.init_carry(model_config, batch_size))


def _state_tree(state: TrainState) -> dict:
    """The checkpointed tree of a TrainState: `step`, `params`, `carry` and the
    optimiser state as `optim.state_tree` lays it out (`averaging`, and `opt_state`,
    the list of the optimiser's own leaves, when it has any), rebuilt by
    `_state_from_tree` from the transformation's own structure."""
    return {"step": state.step, "params": state.params,
            **optim.state_tree(state.opt_state), "carry": state.carry}


def _state_from_tree(tree: dict, tx) -> TrainState:
    carry = tuple(tuple(layer) for layer in tree["carry"])
    return TrainState(step=jnp.asarray(tree["step"]), params=tree["params"],
                      opt_state=optim.state_from_tree(tx, tree["params"], tree),
                      carry=carry)


# -------------------------------------------------------------------------- the loop

@dataclasses.dataclass
class LoopRecord:
    """Where the loop is, and what it has seen: the JSON part of a checkpoint."""

    mode: str  # "train" or "finetune"
    epoch: int = 1  # the epoch to run next (1-based)
    batch_in_epoch: int = 0  # windows of that epoch already done
    history: list = dataclasses.field(default_factory=list)  # validation losses
    best_val: float | None = None
    best_epoch: int | None = None
    switched_at_epoch: int | None = None  # NT-ASGD switch
    epoch_loss_sum: float = 0.0  # training loss summed over this epoch's steps so far
    epoch_steps: int = 0  # the steps in that sum (all steps done in this epoch)
    done: bool = False
    result: dict | None = None
    optimizer: str = "sgd"  # optim.name (records written before it existed: sgd)


class _Interrupt:
    """Turns Ctrl-C into a flag the loop checks after each step (then saves)."""

    def __init__(self, notice: Callable[[], None] | None = None):
        self.requested = False
        self._old = None
        self._notice = notice  # called at the first Ctrl-C

    def __enter__(self):
        try:
            self._old = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread: leave Ctrl-C alone
            self._old = None
        return self

    def _handle(self, signum, frame):
        if self.requested:  # a second Ctrl-C aborts at once
            raise KeyboardInterrupt
        self.requested = True
        if self._notice is not None:
            self._notice()

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)


class StopPolicy:
    """When the loop leaves an epoch early or saves in the middle of one: Ctrl-C, the
    stop step (`train.stop_at_step`), the time budget (`train.time_budget_s`) and the
    checkpoint cadence (`train.checkpoint_every_s`).

    A context manager (Ctrl-C is caught while it is open); `after_step` is asked once
    per step. In a run of several processes the inputs that differ between them (the
    Ctrl-C flag, the clocks) go through the plan's `agree` on checked steps, so every
    process takes the same decision at the same step. Once a stop is decided, `reason`
    says why. `settings`: the run's `RunSettings` (or anything with those three keys'
    names as attributes, a config's `train` section say).
    """

    INTERRUPT, STOP, SAVE = "interrupt", "stop", "save"

    def __init__(self, settings, plan: parallel.Plan | None = None,
                 clock: Callable[[], float] = time.perf_counter):
        self.stop_at_step = settings.stop_at_step
        self.time_budget_s = settings.time_budget_s
        self.checkpoint_every_s = settings.checkpoint_every_s
        self.plan, self.clock = parallel.resolve(plan), clock
        self.start = self.last_save = clock()
        self.reason: str | None = None
        self._interrupt = _Interrupt()

    def __enter__(self):
        self._interrupt.__enter__()
        return self

    def __exit__(self, *exc):
        self._interrupt.__exit__(*exc)

    def after_step(self, step: int, checked: bool, last: bool) -> str | None:
        """The action after global step `step`: INTERRUPT (save, then raise), STOP
        (save and stop), SAVE (a checkpoint by the cadence) or None. `checked`: a step
        where processes compare notes (the logging steps); `last`: the epoch's last
        step, which neither stops nor saves here (the end of the epoch does both)."""
        now = self.clock()
        requested, elapsed, since_save = (self._interrupt.requested, now - self.start,
                                          now - self.last_save)
        # every process takes the same branches
        requested, elapsed, since_save = self.plan.agree(
            checked, requested, elapsed, since_save)
        if requested:
            return self.INTERRUPT
        if self.stop_at_step and step >= self.stop_at_step:
            self.reason = f"reached train.stop_at_step={self.stop_at_step}"
        elif self.time_budget_s and elapsed >= self.time_budget_s:
            self.reason = f"used the time budget of {self.time_budget_s:g} s"
        if self.reason:
            return None if last else self.STOP
        if since_save >= self.checkpoint_every_s and not last:
            return self.SAVE
        return None

    def saved(self) -> None:
        """A checkpoint was written: the cadence counts from now."""
        self.last_save = self.clock()

    def interrupted(self, checked: bool = True) -> bool:
        """Whether Ctrl-C was pressed (in any process, agreed on `checked` calls):
        asked between the windows of a validation."""
        return self.plan.agree(checked, self._interrupt.requested)[0]


def _ppl(loss: float) -> float:
    """exp(loss), inf past a float's range (a diverged run's loss) instead of an error."""
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf


@jax.jit
def _all_finite(tree) -> jax.Array:
    """Whether every element of `tree`'s float arrays is finite (a bool scalar)."""
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)
              if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


class _ValidationInterrupted(Exception):
    """Ctrl-C during a validation: the loop saves and stops; the epoch's end is redone
    on resume."""


def _eval_progress(label: str, batch_size: int, primary: bool,
                   policy: StopPolicy | None = None) -> Callable[[int, int], None]:
    """The `(done_rows, total_rows)` callback of an evaluation inside training: a
    progress line on stderr (process 0 only); with `policy`, raises
    `_ValidationInterrupted` once a Ctrl-C is seen (every 8th window, and agreed by
    all processes, so that all stop at the same window)."""
    line = Progress(label, 0, batch_size,
                    **({} if primary else {"stream": parallel.NullStream()}))
    calls = [0]

    def callback(done: int, total: int) -> None:
        line.count(done, total)
        calls[0] += 1
        if done == total:
            line.close()
        elif policy is not None and policy.interrupted(calls[0] % 8 == 0):
            line.close()
            raise _ValidationInterrupted
    return callback


def _validation_loss(run: _Run, params, progress=None) -> float:
    """The mean NLL of `params` on the validation split (its first
    `train.eval_max_tokens` tokens, if set), over the run's plan."""
    s, ids = run.settings, run.corpus.valid
    if s.eval_max_tokens:
        ids = ids[: s.eval_max_tokens]
    logp = evaluate.token_logprobs(run.model_config, params, ids, s.eval_batch_size,
                                   s.bptt, progress, plan=run.plan)
    return -float(np.mean(logp, dtype=np.float64))


def base_lr(config, mode: str) -> tuple[str, float]:
    """The key and value of the base learning rate of a `mode` run: `finetune.lr` for a
    finetune, else `optim.lr`."""
    key = "finetune.lr" if mode == "finetune" else "optim.lr"
    section, name = key.split(".")
    return key, config[section][name]


@dataclasses.dataclass(frozen=True)
class RunSettings:
    """The config's values that a run reads once it is set up, typed, read from the
    config once (`from_config`): nothing below `_setup` reads the config itself.

    `lr_key`, `lr`: the base learning rate's key and value for the run's mode
    (`base_lr`); `max_epochs`: `finetune.max_epochs` for a finetune, else
    `train.max_epochs`. `stop_at_step`, `time_budget_s` and `checkpoint_every_s` are
    what a `StopPolicy` reads.
    """

    mode: str  # "train" or "finetune"
    seed: int  # train.seed
    batch_size: int  # data.*
    eval_batch_size: int
    test_batch_size: int
    bptt: int
    max_seq_len_delta: int
    lr_key: str  # the learning-rate rule's choice
    lr: float
    max_epochs: int
    steps_per_epoch: int  # train.*
    log_every_steps: int
    eval_max_tokens: int
    test: bool
    min_improvement: float
    patience: int
    stop_at_step: int
    time_budget_s: float
    checkpoint_every_s: float
    asgd: bool  # optim.asgd (a training's)
    nonmono: int  # optim.nonmono
    init_from: str  # finetune.init_from (a finetune's)

    @classmethod
    def from_config(cls, config, mode: str) -> RunSettings:
        """The settings of a `mode` run of `config`. The keys of the other mode (a
        training's early stopping and NT-ASGD switch, a finetune's source) are not
        read: a finetune has neither rule, a training no source."""
        d, t, o = config.data, config.train, config.optim
        lr_key, lr = base_lr(config, mode)
        if mode == "finetune":
            f = config.finetune
            max_epochs, init_from = f.max_epochs, f.init_from
            asgd, min_improvement, patience = False, 0.0, 0
        else:
            max_epochs, init_from = t.max_epochs, ""
            asgd, min_improvement, patience = (o.asgd, float(t.min_improvement),
                                               int(t.patience))
        return cls(
            mode=mode, seed=t.seed, batch_size=d.batch_size,
            eval_batch_size=d.eval_batch_size, test_batch_size=d.test_batch_size,
            bptt=d.bptt, max_seq_len_delta=d.max_seq_len_delta, lr_key=lr_key, lr=lr,
            max_epochs=max_epochs, steps_per_epoch=t.steps_per_epoch,
            log_every_steps=t.log_every_steps, eval_max_tokens=t.eval_max_tokens,
            test=t.test, min_improvement=min_improvement, patience=patience,
            stop_at_step=t.stop_at_step, time_budget_s=t.time_budget_s,
            checkpoint_every_s=t.checkpoint_every_s, asgd=asgd, nonmono=o.nonmono,
            init_from=init_from)


@dataclasses.dataclass(frozen=True)
class _Run:
    """What one invocation of the loop works with, built once from the config by
    `_setup` and fixed while it runs: the placement plan, the optimiser, the model
    config, the corpus, the step and the typed `settings`. The loop and everything
    below it take this, never the config."""

    settings: RunSettings
    saved_config: dict  # what config.json keeps of the run's config
    workdir: Path
    log: Callable[[str], None]
    plan: parallel.Plan  # the placement plan
    primary: bool  # process 0: logs and writes metrics
    corpus: data_lib.Corpus
    model_config: model_lib.ModelConfig
    train_rows: np.ndarray  # this process's columns of the training stream
    buckets: tuple
    optimizer: optim.Optimizer
    step_fn: Any  # build_train_step's: a TrainStep or a parallel.MappedStep
    store: CheckpointStore
    metrics: Any
    abstract: Any  # the checkpoint tree's shapes and shardings
    changes: dict  # config keys changed since the last start: {key: (old, new)}

    @property
    def mode(self) -> str:
        return self.settings.mode

    @property
    def finetuning(self) -> bool:
        return self.mode == "finetune"

    @property
    def lr(self) -> float:
        return self.settings.lr

    @property
    def max_epochs(self) -> int:
        return self.settings.max_epochs

    def stopped_early(self, history: Sequence[float]) -> bool:
        """Training's early-stopping rule (`train.min_improvement`, `train.patience`)
        on the validation losses so far; never for a finetune (its own rule)."""
        s = self.settings
        return not self.finetuning and optim.stopped_improving(
            history, s.min_improvement, s.patience)


def _setup(config, workdir: str | Path, mode: str, log: Callable[[str], None],
           data_given: Sequence[str], plan: parallel.Plan) -> _Run:
    """Check the config against the work directory (and the finetune source), load the
    corpus, build the optimiser and the step on `plan` (the run's, joined by `_run`),
    and read the settings: the only part of a run that reads the config. Writes
    nothing but empty directories: `config.json` is written by `_started`, once the
    run has started. A finetune takes its data section from its run
    (`runcompat.finetune_data`). `_run` has checked every value already."""
    primary = plan.is_primary  # only process 0 logs and writes metrics
    optimizer = optim.from_config(config.optim)  # a wrong optim.name fails here
    if not primary:
        log = lambda message: None  # noqa: E731
    workdir = Path(workdir)
    if mode == "finetune":
        config = runcompat.finetune_data(config, workdir, data_given, log)
    changes = runcompat.config_changes(config, workdir, log)
    if mode == "finetune" and not runcompat.has_work(workdir, ("checkpoints",)):
        # a resume needs no source: it restores its own
        runcompat.check_finetune_source(config)
    settings = RunSettings.from_config(config, mode)
    corpus = _run_corpus(config, workdir, mode)
    runcompat.check_vocabulary(config, workdir, mode, corpus)
    _check_split_sizes(settings, corpus)
    model_config = model_config_from(config, corpus.vocab_size)
    s = settings
    train_rows = batchify(corpus.train, s.batch_size)
    buckets = default_buckets(s.bptt, s.bptt + s.max_seq_len_delta)
    step_fn = build_train_step(config, model_config, plan, optimizer=optimizer)
    train_rows = plan.local_columns(train_rows)  # this host's columns only
    log(f"{plan.describe()}, {plan.per_device(s.batch_size)} columns per device")
    plan.note_evaluation((s.eval_batch_size, s.test_batch_size), log)
    abstract = jax.eval_shape(lambda: _state_tree(init_state(
        model_config, model_lib.init_params(model_config, jax.random.key(0)),
        s.batch_size, step_fn.tx)))
    abstract = plan.abstract(abstract)  # any layout restores into ours
    workdir.mkdir(parents=True, exist_ok=True)
    metrics = MetricsWriter(workdir) if primary else parallel.NullMetrics()
    return _Run(settings, runcompat.saved_config(config), workdir, log, plan, primary,
                corpus, model_config, train_rows, buckets, optimizer, step_fn,
                CheckpointStore(workdir), metrics, abstract, changes)


def _run_corpus(config, workdir: Path, mode: str) -> data_lib.Corpus:
    """The corpus of `config`; for a subword run that continues weights (a resume, or
    a finetune from its run), tokenised with the tokenizer those weights were trained
    with (its `tokenizer.json`) when the one trained now differs (another version of
    the `tokenizers` library, say), in `config`'s order: `runcompat.check_vocabulary`
    then compares the ids, as for every run."""
    corpus = load_corpus_from(config)
    if corpus.subwords is None:
        return corpus
    if runcompat.has_work(workdir):
        directory = workdir
    elif mode == "finetune" and config.finetune.init_from:
        directory = Path(config.finetune.init_from)
    else:
        return corpus
    try:
        subwords = data_lib.load_subwords(directory)
    except DataError:  # damaged: the vocabulary check decides, as without one
        return corpus
    if subwords is None or subwords.spec == corpus.subwords.spec or (
            subwords.kind, subwords.size) != (corpus.subwords.kind, corpus.subwords.size):
        return corpus
    first = data_lib.read_corpus(config.data.dir, vocab=subwords.pieces, subwords=subwords)
    return data_lib.order_vocab(first, vocab_order(config))


def _check_split_sizes(settings: RunSettings, corpus: data_lib.Corpus) -> None:
    """Before any work: every split the run reads holds at least two tokens per column
    of its batch size (what `batchify` needs), so that no validation or final test
    fails after the training it follows."""
    s = settings
    valid = len(corpus.valid) if not s.eval_max_tokens else min(len(corpus.valid),
                                                                 s.eval_max_tokens)
    checks = [("data.batch_size", s.batch_size, "train", len(corpus.train), ""),
              ("data.eval_batch_size", s.eval_batch_size, "valid", valid,
               f" (train.eval_max_tokens={s.eval_max_tokens})" if s.eval_max_tokens
               else "")]
    if s.test:
        checks.append(("data.test_batch_size", s.test_batch_size, "test",
                       len(corpus.test), ""))
    for key, batch, split, tokens, why in checks:
        if tokens // batch < 2:
            raise ConfigError(
                f"--config.{key}={batch} is too large for the {tokens:,} tokens of the "
                f"{split} split{why}: each column needs at least 2 tokens; use at most "
                f"{max(tokens // 2, 1)}")


def _started(run: _Run, step: int) -> None:
    """The run has started (restored or initialised): write its `config.json` and
    `vocab.json` (process 0, atomically) and say, and record in `metrics.jsonl`, which
    keys changed."""
    if not run.primary:
        return
    try:
        recorded = data_lib.load_vocab(run.workdir)
    except DataError:  # damaged, and (checked in _setup) bound to no checkpoint
        recorded = None
    if recorded is None or recorded != run.corpus.vocab:  # (a differing one: no work)
        data_lib.save_vocab(run.workdir, run.corpus.vocab)
    data_lib.save_subwords(run.workdir, run.corpus.subwords)
    data_lib.atomic_write_bytes(run.workdir / "config.json", json.dumps(
        run.saved_config, indent=2, sort_keys=True).encode())
    if run.changes:
        run.log("config changed since the last start: " + "; ".join(
            f"{key}: {old!r} -> {new!r}" for key, (old, new) in run.changes.items()))
        run.metrics.write({"config_changes": {k: list(v) for k, v in run.changes.items()},
                           "step": step})


def _restore_or_init(run: _Run) -> tuple[TrainState, LoopRecord]:
    """The latest checkpoint of the work directory, or a new state (finetuning: from
    the training run's best weights)."""
    store, mode, tx, name = run.store, run.mode, run.step_fn.tx, run.optimizer.name
    if store.latest_step() is not None:
        saved_by = store.latest_meta().get("optimizer", "sgd")
        if saved_by != name:
            raise CheckpointError(
                f"the checkpoints in {run.workdir} hold the state of optimiser "
                f"{saved_by!r} (optim.name), not of {name!r}: resume with "
                f"--config.optim.name={saved_by}, or use a new --workdir")
        tree, meta = _restore_latest(run)
        state = _state_from_tree(tree, tx)
        record = LoopRecord(**meta)
        if record.mode != mode:
            raise CheckpointError(
                f"{run.workdir} holds a {record.mode} run; use another --workdir for {mode}")
        run.log(f"resuming {mode} from step {int(state.step)} (epoch {record.epoch}, "
                f"batch {record.batch_in_epoch}) in {run.workdir}")
        return state, record
    record = LoopRecord(mode=mode, optimizer=name)
    s, mc, batch_size = run.settings, run.model_config, run.settings.batch_size
    if run.finetuning:
        params, start_val, init_epoch = _finetune_start(run)
        record.best_val, record.best_epoch = start_val, 0
        state = init_state(mc, params, batch_size, tx, averaging_active=True)
        store.save_best(0, params, {"val_loss": start_val, "epoch": 0})
        # The starting weights' validation: what the finetune keeps if no epoch beats it
        # (mos_jax.plot labels and places the finetune's curve with it).
        # Nested, so that a reader of the epochs' records (valid_loss, ...) skips it.
        run.metrics.write({"mode": mode, "step": 0, "finetune_start": {
            "init_from": str(Path(s.init_from).resolve()),
            "init_epoch": init_epoch, "valid_loss": start_val,
            "valid_ppl": _ppl(start_val)}})
    else:
        params = model_lib.init_params(mc, jax.random.key(s.seed))
        state = init_state(mc, params, batch_size, tx)
    run.log(f"{mode}: {model_lib.param_count(state.params):,} parameters, "
            f"{run.corpus!r}, workdir {run.workdir}")
    return state, record


def _restore_latest(run: _Run) -> tuple[dict, dict]:
    """The latest checkpoint's tree and record, in the layout of `run.abstract`.

    A checkpoint of a run with a schedule written before the schedule's count was part
    of the optimiser state (`optim.LearningRateState`, the last of the optimiser's
    leaves), or of a run started without a schedule, lacks that leaf: it is restored
    without it, and the count is the step (the updates taken, which is all the schedule
    counts). One of a run with a schedule resumed without one has that leaf more: it is
    restored and dropped."""
    abstract = run.abstract
    wanted = abstract.get("opt_state", [])
    stored = run.store.latest_shapes()
    scheduled = run.optimizer.schedule is not None
    held = None if stored is None else sum(
        path.startswith("['opt_state']") for path in stored)
    if not scheduled and held == len(wanted) + 1:
        # A schedule taken off on resume (its keys may change): its count, the last
        # leaf, is restored and dropped.
        count = jax.ShapeDtypeStruct((), jnp.int32, sharding=abstract["step"].sharding)
        tree, meta = run.store.restore({**abstract, "opt_state": [*wanted, count]})
        tree["opt_state"] = tree["opt_state"][:-1]
        if not tree["opt_state"]:
            del tree["opt_state"]
        return tree, meta
    if not (scheduled and wanted and held == len(wanted) - 1):
        return run.store.restore(abstract)
    older = {key: value for key, value in abstract.items() if key != "opt_state"}
    if len(wanted) > 1:
        older["opt_state"] = wanted[:-1]
    tree, meta = run.store.restore(older)
    count = jnp.array(tree["step"], jnp.int32, copy=True)  # not the step's own buffer
    tree["opt_state"] = [*tree.get("opt_state", []), count]
    run.log("the checkpoint holds no schedule count (written before the optimiser "
            "state kept it, or without a schedule): the schedule counts from its step, "
            f"{int(tree['step'])}")
    return tree, meta


class _Loop:
    """The state of a run between steps: the train state, the loop record, and this
    epoch's step losses not yet summed into the record (device scalars: no host sync
    per step)."""

    def __init__(self, run: _Run, state: TrainState, record: LoopRecord):
        self.run, self.state, self.record = run, state, record
        self.host_step = int(state.step)  # state.step, counted on the host
        self.pending: list = []
        self.progress: Progress | None = None
        self.last_lr = None  # the learning rate of the last step taken

    def fold_losses(self) -> None:
        self.record.epoch_loss_sum += sum(float(x) for x in self.pending)
        self.record.epoch_steps += len(self.pending)
        self.pending.clear()

    def save(self) -> None:
        """A checkpoint of the current state, once it is checked finite (never one
        with a non-finite loss or parameter: see `check_finite`)."""
        self.fold_losses()
        placed = self.run.plan.place_state(self.state)
        self.check_finite(placed)
        self.run.store.save(int(placed.step), _state_tree(placed),
                            dataclasses.asdict(self.record))

    def check_finite(self, state: TrainState | None = None) -> None:
        """Raise `TrainingError` unless this epoch's losses so far, every parameter and
        the optimiser's state (the averaged parameters among it) are finite: one
        reduction on the device."""
        state = self.state if state is None else state
        self.fold_losses()
        if not (math.isfinite(self.record.epoch_loss_sum)
                and bool(_all_finite((state.params, state.opt_state)))):
            self.diverged("the training loss or the parameters became non-finite")

    def diverged(self, what: str) -> None:
        """Training diverged: say so, and which checkpoint (all are finite) to resume."""
        run, last = self.run, self.run.store.latest_step()
        key = run.settings.lr_key
        lower = f"--config.{key}={run.lr / 2:g}"
        if last is None:
            where = (f"no checkpoint was written before (the work directory keeps no "
                     f"state): start again with a lower {lower} or --config.optim.clip")
        else:
            where = (f"nothing was saved; the last checkpoint in {run.workdir} is step "
                     f"{last}, with finite weights: continue from it with a lower "
                     f"learning rate, e.g. `{_continue_command(run, lower)}`")
        raise TrainingError(f"{what} by step {self.host_step} (epoch {self.record.epoch}, "
                            f"{key}={run.lr:g}): {where}")

    def run_epoch(self, policy: StopPolicy) -> bool:
        """The current epoch's remaining windows; False if the policy stopped it early."""
        run, record = self.run, self.record
        s = run.settings
        epoch = record.epoch
        windows = list(train_windows(len(run.train_rows), np.random.default_rng([s.seed, epoch]),
                                     s.bptt, s.bptt + s.max_seq_len_delta, run.buckets))
        if s.steps_per_epoch:
            windows = windows[:s.steps_per_epoch]
        if record.batch_in_epoch == 0:
            self.state = self.state.replace(
                carry=model_lib.init_carry(run.model_config, s.batch_size))
        progress = self.progress = Progress(
            f"{run.mode} epoch {epoch}", len(windows), s.batch_size,
            start=record.batch_in_epoch,
            **({} if run.primary else {"stream": parallel.NullStream()}))
        for k in range(record.batch_in_epoch, len(windows)):
            w = windows[k]
            inputs, targets, length = padded_window(run.train_rows, w.start, w.length,
                                                    w.padded)
            self.state, m = run.step_fn(self.state, inputs, targets, length, w.seq_len,
                                        run.lr)
            self.last_lr = m["lr"]  # what the step applied (a device scalar)
            self.host_step += 1
            self.pending.append(m["loss"])  # no host sync here
            record.batch_in_epoch = k + 1
            last = k + 1 == len(windows)
            checked = (k + 1) % s.log_every_steps == 0 or last
            if checked:
                self._log_step(progress, k + 1, w, float(m["loss"]))
            else:
                progress.update(k + 1, w.length, ready=m["loss"])  # shown once done
            action = policy.after_step(self.host_step, checked, last)
            if action == policy.INTERRUPT:
                self.save()
                progress.close()
                raise KeyboardInterrupt(
                    f"checkpoint saved at step {self.host_step}; continue with "
                    f"`{_continue_command(run)}`")
            if action == policy.STOP:
                break
            if action == policy.SAVE:
                self.save()
                policy.saved()
        progress.close()
        return record.batch_in_epoch == len(windows)

    def _log_step(self, progress: Progress, done: int, window, loss: float) -> None:
        if not math.isfinite(loss):
            self.diverged(f"the training loss became {loss}")
        self.fold_losses()
        # the step reports it (optim.Optimizer.learning_rate of its state)
        progress.update(done, window.length, loss=loss, lr=float(self.last_lr))

    def end_epoch(self, policy: StopPolicy) -> str | None:
        """Validate, keep the best weights, apply NT-ASGD's switch, move to the next
        epoch and save. Returns why training ends here, if it does."""
        run, record = self.run, self.record
        epoch = record.epoch
        self.check_finite()  # before the best weights are saved
        watch = _eval_progress(f"{run.mode} epoch {epoch} validation",
                               run.settings.eval_batch_size, run.primary, policy)
        try:
            stop = _end_of_epoch(run, record, self.state, self.progress, watch,
                                 last_lr=None if self.last_lr is None
                                 else float(self.last_lr))
        except _ValidationInterrupted:  # the epoch's training is saved, its end redone
            self.save()
            run.store.close()
            raise KeyboardInterrupt(
                f"stopped during the validation of epoch {epoch}; checkpoint saved at "
                f"step {self.host_step} (the validation is redone on resume); continue "
                f"with `{_continue_command(run)}`") from None
        if record.switched_at_epoch == epoch:
            self.state = self.state.replace(opt_state=optim.switch_on(self.state.opt_state))
        record.epoch += 1
        record.batch_in_epoch = 0
        record.epoch_loss_sum, record.epoch_steps = 0.0, 0
        self.save()
        policy.saved()
        if stop:
            why = (f"validation stopped improving (non-monotone rule, "
                   f"nonmono={run.settings.nonmono})")
            run.log(f"finetune: {why}; stopping after epoch {epoch}")
            return why
        if run.stopped_early(record.history):
            t = run.settings
            why = (f"validation perplexity improved by less than "
                   f"{t.min_improvement:.2%} per epoch over the last "
                   f"{t.patience} epoch(s) (train.min_improvement)")
            run.log(f"train: {why}; stopping after epoch {epoch}")
            return why
        if record.epoch > run.max_epochs:
            return f"reached {run.mode}.max_epochs={run.max_epochs}"
        return None


def _run(config, workdir: str | Path, mode: str, log: Callable[[str], None],
         data_given: Sequence[str] = ()) -> dict:
    """Set up, restore or initialise, run epochs until the end or a stop, conclude.

    The result says whether training `finished` (then it holds the final validation
    and test figures) and the `reason` it ended; `trained_steps` counts the steps this
    call took (0 when the run had finished before and is only reported).
    """
    # One run per work directory: the lock is taken (by process 0 of a multi-process
    # run) before anything in it is read or written, and held to the end.
    config_lib.validate(config, unknown_ok=True)  # every value, before any work
    plan = parallel.from_config(config)  # a multi-host run joins before JAX work
    with workdir_lib.hold(workdir, mode, plan):
        run = _setup(config, workdir, mode, log, data_given, plan)
        try:
            return _run_loop(run)
        finally:  # errors included: an open Orbax manager complains at exit
            run.store.close()


def _run_loop(run: _Run) -> dict:
    mode, log, workdir = run.mode, run.log, run.workdir
    state, record = _restore_or_init(run)
    stopped_early = run.stopped_early(record.history)
    if record.done and (run.finetuning or record.epoch > run.max_epochs or stopped_early):
        more = ("lower --config.train.min_improvement" if stopped_early
                else f"raise --config.{mode}.max_epochs")
        log(f"{run.workdir} has finished: {json.dumps(record.result)} ({more} to "
            "train on)")
        result = dict(record.result or {})
        result.setdefault("reason", "finished before")
        return {**result, "finished": True, "trained_steps": 0}
    stop_at = run.settings.stop_at_step
    if stop_at and stop_at <= int(state.step):
        raise ConfigError(
            f"train.stop_at_step={stop_at}, but the run in {workdir} is already at step "
            f"{int(state.step)}: give a later step, or --config.train.stop_at_step=0 to "
            "train on to the end")
    _started(run, int(state.step))
    record.done = False
    loop = _Loop(run, state, record)
    start_step, traces_before = loop.host_step, run.step_fn.traces
    finished_why = None
    with StopPolicy(run.settings, run.plan) as policy:
        while record.epoch <= run.max_epochs and policy.reason is None:
            if not loop.run_epoch(policy):
                break  # stopped mid-epoch
            finished_why = loop.end_epoch(policy)
            if finished_why:
                break
    compilations = run.step_fn.traces - traces_before
    log(f"compiled train-step programs: {compilations}")
    trained = {"compilations": compilations, "trained_steps": loop.host_step - start_step}
    # A stop (step, time budget) reached at the end of an epoch that ended training
    # (finetune's rule, early stopping, the last epoch) leaves nothing to continue.
    if policy.reason is not None and finished_why is None:
        loop.save()
        # The saved config.json holds no stop step: this command trains on.
        log(f"stopped: {policy.reason}; continue with `{_continue_command(run)}`")
        return {"stopped": policy.reason, "step": loop.host_step, "epoch": record.epoch,
                **trained, "finished": False, "reason": policy.reason}
    result = _finish(run, record)
    result.update(compilations=compilations, finished=True,
                  reason=finished_why or f"reached {mode}.max_epochs={run.max_epochs}")
    record.done, record.result = True, result
    loop.save()
    return {**result, "trained_steps": trained["trained_steps"]}


def _continue_command(run: _Run, *extra: str) -> str:
    """The command that continues this run (its `config.json`, which keeps no stop
    step), with `extra` overrides."""
    return " ".join((f"mos-jax {run.mode} --workdir {run.workdir}",) + extra)


def _end_of_epoch(run: _Run, record: LoopRecord, state: TrainState, progress: Progress,
                  watch=None, last_lr: float | None = None) -> bool:
    """Validate, log, keep the best weights, apply the NT-ASGD rule.

    Returns True when finetuning should stop (the same non-monotone rule). `watch`:
    the validation's progress callback (`_eval_progress`); nothing changes before the
    validation is done, so a validation it interrupts is simply redone.
    """
    s, mode, store, log = run.settings, run.mode, run.store, run.log
    epoch = record.epoch
    train_s = progress.elapsed  # this epoch's training (since a resume), not validation
    params = optim.eval_params(state.opt_state, state.params)
    val = _validation_loss(run, params, watch)
    averaged = params is not state.params
    if not math.isfinite(val):  # finite weights, yet: never saved as the best
        raise TrainingError(
            f"the validation loss of epoch {epoch} is {val}: lower --config.{s.lr_key}; "
            f"the checkpoints in {store.workdir} were not touched")
    if record.best_val is None or val < record.best_val:
        record.best_val, record.best_epoch = val, epoch
        store.save_best(int(state.step), params, {"val_loss": val, "epoch": epoch})
    trigger = optim.should_switch(record.history, val, s.nonmono)
    if mode == "train" and s.asgd and record.switched_at_epoch is None and trigger:
        record.switched_at_epoch = epoch
        log(f"epoch {epoch}: switching to averaged SGD (NT-ASGD)")
    record.history.append(val)
    train_loss = record.epoch_loss_sum / max(record.epoch_steps, 1)
    entry = {"mode": mode, "epoch": epoch, "step": int(state.step),
             "train_loss": train_loss, "valid_loss": val, "valid_ppl": _ppl(val),
             "lr": s.lr, "last_lr": last_lr,
             "averaging": bool(averaged or mode == "finetune"),
             "tokens_per_s": progress.tokens_per_s, "wall_time": progress.elapsed,
             "train_tokens": progress.tokens, "train_s": train_s}
    run.metrics.write(entry)
    log(f"{mode} epoch {epoch}: train loss {train_loss:.3f} | valid ppl {_ppl(val):.2f}"
        f"{' (averaged)' if averaged else ''} | best {_ppl(record.best_val):.2f}")
    return mode == "finetune" and trigger


def _finish(run: _Run, record: LoopRecord) -> dict:
    """Test the best weights with the test batch size; the run's result."""
    s, log = run.settings, run.log
    params, meta = run.store.restore_best(run.abstract["params"])
    result = {"best_epoch": meta["epoch"], "valid_loss": meta["val_loss"],
              "valid_ppl": _ppl(meta["val_loss"])}
    if record.mode == "finetune" and meta["epoch"] == 0:
        log("finetune: no epoch improved on the starting weights; keeping them")
    if s.test:
        watch = _eval_progress(f"{record.mode} test", s.test_batch_size, run.primary)
        with _Interrupt(lambda: log(
                "Ctrl-C: training is over and saved; the run ends when this test is "
                "done (Ctrl-C again aborts the test)")):
            logp = evaluate.token_logprobs(run.model_config, params, run.corpus.test,
                                           s.test_batch_size, s.bptt, watch,
                                           plan=run.plan, log=log)
        test = -float(np.mean(logp, dtype=np.float64))
        result.update(test_loss=test, test_ppl=_ppl(test))
    run.metrics.write({"mode": record.mode, "final": True, **result})
    log(f"{record.mode} finished: " + ", ".join(
        f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in result.items()))
    return result


def _finetune_start(run: _Run):
    """The best weights of the run a finetune starts from (`finetune.init_from`), in
    the run's layout, their validation loss and epoch."""
    source = run.settings.init_from
    abstract = jax.eval_shape(
        lambda: model_lib.init_params(run.model_config, jax.random.key(0)))
    abstract = run.plan.abstract(abstract)
    with CheckpointStore(source, read_only=True) as store:
        if not store.has_best():
            raise CheckpointError(f"{source} has no best weights (best/): is it the work "
                                  "directory of a `mos-jax train` run?")
        params, meta = store.restore_best(abstract)
    watch = _eval_progress("finetune start validation", run.settings.eval_batch_size,
                           run.primary)
    val = _validation_loss(run, params, watch)
    run.log(f"finetune: starting from {source} (epoch {meta['epoch']}), valid ppl "
            f"{_ppl(val):.2f}")
    return params, val, int(meta["epoch"])


def train_and_evaluate(config, workdir: str | Path,
                       log: Callable[[str], None] = note) -> dict:
    """Train from scratch or resume the run in `workdir`.

    Returns `finished` (bool), `reason` (why the loop ended), `trained_steps` (this
    call's), `compilations`; once finished the best epoch and its validation (and test)
    loss and perplexity; when stopped early `stopped` (the reason), `step`, `epoch`.
    """
    return _run(config, workdir, "train", log)


def finetune(config, workdir: str | Path, log: Callable[[str], None] = note,
             data_given: Sequence[str] = ()) -> dict:
    """The finetune stage from `config.finetune.init_from`'s best weights; returns
    what `train_and_evaluate` returns.

    The data section (corpus, batch layout) is the training run's, from its
    `config.json`, except the keys named in `data_given` (e.g. `("dir",)` to finetune
    on `config.data.dir`); the `mos-jax finetune` command names those given as
    --config.data.* overrides.
    """
    return _run(config, workdir, "finetune", log, data_given)


def load_run_config(workdir: str | Path):
    """The config a run in `workdir` was started with (its `config.json`)."""
    path = Path(workdir) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{workdir} has no config.json: is it the work directory "
                              "of a `mos-jax train` run?")
    config = config_lib.from_json(path.read_text())
    if "train" in config and "stop_at_step" in config.train:
        with config.unlocked():  # a launch key (files written before it was one)
            config.train.stop_at_step = 0
    return config


@dataclasses.dataclass
class BestWeights:
    """A run's best weights and what scoring text with them needs.

    `vocab`: the run's vocabulary (id -> word), from its `vocab.json`, or from its
    corpus for runs from before vocabularies were recorded (`recorded` False).
    `corpus`: the run's corpus with its words mapped into `vocab` by string (None when
    not asked for); `unknown`: its words the vocabulary lacks (a changed corpus).
    """

    config: Any
    model_config: model_lib.ModelConfig
    params: Any
    vocab: tuple
    recorded: bool
    corpus: data_lib.Corpus | None = None
    unknown: list = dataclasses.field(default_factory=list)
    subwords: Any = None  # a subword run's tokenizer (mos_jax.subword.Subwords)


def load_run(workdir: str | Path, corpus: bool = True,
             splits: tuple = data_lib.SPLITS) -> BestWeights:
    """The best weights saved in `workdir`, with the run's vocabulary, and (`corpus`)
    the run's corpus read through that vocabulary (`splits`: the splits that will be
    read, as `data.map_to_vocab` takes them)."""
    config = load_run_config(workdir)
    vocab = data_lib.load_vocab(workdir)
    subwords = data_lib.load_subwords(workdir)
    recorded, run_corpus, unknown = vocab is not None, None, []
    if corpus or vocab is None:
        run_corpus = load_corpus_from(config)
        if vocab is None:
            vocab = run_corpus.vocab
        elif subwords is not None and run_corpus.vocab != vocab:  # the run's tokenizer
            run_corpus = data_lib.read_corpus(config.data.dir, vocab=vocab,
                                              subwords=subwords)
        else:
            run_corpus, unknown = data_lib.map_to_vocab(run_corpus, vocab, splits)
    model_config = model_config_from(config, len(vocab))
    abstract = jax.eval_shape(lambda: model_lib.init_params(model_config, jax.random.key(0)))
    with CheckpointStore(workdir, read_only=True) as store:
        if not store.has_best():
            raise CheckpointError(f"{workdir} has no best weights yet: train at least one "
                                  "epoch first")
        params, _ = store.restore_best(parallel.local_plan(1, "none").abstract(abstract))
    return BestWeights(config, model_config, params, tuple(vocab), recorded,
                       run_corpus if corpus else None, unknown, subwords)


def load_best(workdir: str | Path):
    """`(config, corpus, model_config, params)` of the best weights saved in `workdir`,
    the corpus read through the run's vocabulary (`load_run`)."""
    best = load_run(workdir)
    return best.config, best.corpus, best.model_config, best.params
