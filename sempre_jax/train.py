"""How does one step run over all devices, and how does the training loop go?

The step is per-device code with named-axis collectives, compiled with
`jax.jit` over a ("data",) mesh through `jax.shard_map`: each device runs the
model's loss on its shard of the global batch (DU2MCE all-gathers candidate
embeddings so negatives come from the global batch; the triplet models carry
their negatives; BatchNorm statistics are summed over the mesh). Parameters
are replicated, so `jax.grad` of the local loss share already returns the
psum of the per-device gradients: the gradient of the global-batch loss,
identical to one device on the same batch.

The loop never reads from the devices between log points: batches (a posts
batch is its records' rows, ~100 bytes a post) are parsed ahead (DeviceBatches)
and completed inside the
step (the frozen image inputs gathered by image id from tables placed on the
mesh once, sempre_jax/data.py);
metrics are summed on the devices and read every `log_every_steps`; a step
whose loss or gradient is not finite changes nothing and raises a flag that
the host reads at the next log or checkpoint step, where training stops
naming the first bad step (the last checkpoint before it is kept); a log
line is printed once the next step is dispatched, so the devices do not wait
for the host's printing and TensorBoard writes; the data
iterator's position is taken only when a checkpoint is written; checkpoints
are written asynchronously (sempre_jax/checkpoints.py). Steps are dispatched
ahead of the devices, except on several CPU devices: there XLA runs every
device's part on one shared thread pool, and two steps in flight can each hold
the threads the other's all-reduce waits for (a deadlock), so the loop waits
for each step to finish (without reading it) before dispatching the next.
Preemption (SIGTERM
on one process, JAX's preemption sync point across processes) finishes the
step, checkpoints and exits 0. Evaluators (sempre_jax/evals) are built once
and run every `every_steps`; the best checkpoint on `config.best` is the one
the final evaluators rank (the paper's protocol).
"""

import collections
import functools
import json
import os
import re
import signal
import time
from collections.abc import Mapping
from typing import Any

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax.training import train_state
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from tensorboardX import FileWriter, summary as tb_summary
from tensorboardX.proto.summary_pb2 import Summary

from sempre_jax import checkpoints as ckpt_lib, mesh as mesh_lib
from sempre_jax.experiment import Experiment, Stage

VALIDATION_LOG = "validation.jsonl"
# Keys a resumed run may change: logging, evaluation sizes, and num_epochs
# (to extend a run; stage boundaries are shares of it).
RESUMABLE_CHANGES = ("num_epochs", "log_every_steps", "checkpoint_every_steps", "keep_checkpoints",
                     "num_devices", "evals.*.batch_size", "evals.*.query_chunk",
                     "evals.*.candidate_chunk", "evals.*.every_steps")


class TrainingStopped(RuntimeError):
  """Training cannot go on (e.g. a non-finite loss); the message says why."""


# ============================================================ train state ===

class TrainState(train_state.TrainState):
  """Parameters, optimizer state and the model's other variables ({} or
  {"batch_stats": ...}: BatchNorm statistics, updated by the step)."""
  model_state: Any = None

  def variables(self) -> dict:
    return {"params": self.params, **self.model_state}


def make_optimizer(config: ml_collections.ConfigDict, steps_per_epoch: int,
                   frozen: tuple[str, ...] = ()) -> optax.GradientTransformation:
  """config.optimizer: "adam" (default) or "sgd" (with config.momentum), plus
  config.weight_decay (decoupled, 0 by default); the learning rate is divided
  by `lr_decay` every `lr_decay_epochs`. The top-level parameter collections
  (towers) named in `frozen` get no update and no optimizer state
  (optax.multi_transform with set_to_zero). Each training stage gets a fresh
  optimizer: its schedule and moments start at its first step."""
  schedule = optax.exponential_decay(
      config.learning_rate, transition_steps=config.lr_decay_epochs * steps_per_epoch,
      decay_rate=1.0 / config.lr_decay, staircase=True)
  name = config.get("optimizer", "adam")
  if name == "adam":
    tx = optax.adam(schedule)
  elif name == "sgd":
    tx = optax.sgd(schedule, momentum=config.get("momentum") or None)
  else:
    raise ValueError(f"optimizer must be adam or sgd, got {name!r}")
  wd = config.get("weight_decay", 0.0)
  tx = optax.chain(optax.add_decayed_weights(wd), tx) if wd else tx
  if not frozen:
    return tx
  labels = lambda params: {k: jax.tree.map(lambda _: "frozen" if k in frozen else "train", v)
                           for k, v in params.items()}
  return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)


def create_train_state(variables: Mapping, tx: optax.GradientTransformation) -> TrainState:
  """A train state from initialised model variables (replicated later by the mesh)."""
  variables = dict(variables)
  params = variables.pop("params")
  return TrainState.create(apply_fn=None, params=params, tx=tx, model_state=variables)


# =================================================================== step ===

def make_train_step(loss_fn, mesh: Mesh, seed: int = 0, feed=None):
  """(step, zero_sums): step(state, sums, global batch) -> (state, sums), a
  jit(shard_map) over the mesh. The global batch is arrays on the mesh, or
  (one process) NumPy arrays, which the call places (its in_shardings).

  loss_fn(variables, local batch, rng) -> (this device's share of the global
  loss, psum'ed metrics, model-state updates); the dropout rng differs per
  step and device. `feed` (sempre_jax/data.Feed; None: batches are the
  model's) completes each device's batch inside the step from the tables it
  placed on the mesh, which every call passes to the compiled step. `sums`
  accumulates the metrics of the finite steps, their count ("steps") and the
  first non-finite step ("first_bad", -1: none); a non-finite step leaves
  parameters, optimizer and model state unchanged.
  zero_sums(state, global batch) -> the sums of no step, on the mesh.
  """
  tables, specs = (feed.tables, feed.specs) if feed else ({}, {})

  def per_device(state, batch, tables):
    if feed:
      batch = feed.inputs(batch, tables)
    rng = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), state.step),
                             jax.lax.axis_index(mesh_lib.AXIS))

    def objective(params):
      loss, metrics, updates = loss_fn({"params": params, **state.model_state}, batch, rng)
      return loss, (metrics, updates)

    grads, (metrics, updates) = jax.grad(objective, has_aux=True)(state.params)
    metrics["grad_norm"] = optax.tree.norm(grads)
    steps, opt_state = state.tx.update(grads, state.opt_state, state.params)
    finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    new = state.replace(
        step=state.step + 1,
        params=keep(optax.apply_updates(state.params, steps), state.params),
        opt_state=keep(opt_state, state.opt_state),
        model_state=keep({**state.model_state, **updates}, state.model_state))
    return new, metrics, finite

  def step(state, sums, batch, tables):
    new, metrics, finite = per_device(state, batch, tables)
    sums = {k: sums[k] + jnp.where(finite, metrics[k], 0) for k in metrics} | {
        "steps": sums["steps"] + finite.astype(jnp.int32),
        "first_bad": jnp.where((sums["first_bad"] < 0) & ~finite, new.step, sums["first_bad"])}
    return new, sums

  in_specs = (P(), P(), P(mesh_lib.AXIS), specs)
  shardings = jax.tree.map(lambda spec: NamedSharding(mesh, spec), in_specs,
                           is_leaf=lambda x: isinstance(x, P))
  compiled = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=in_specs, out_specs=(P(), P())),
                     in_shardings=shardings, donate_argnums=0)

  def zero_sums(state, batch):
    metrics = jax.eval_shape(jax.shard_map(
        per_device, mesh=mesh, in_specs=in_specs[:1] + in_specs[2:],
        out_specs=(P(), P(), P())), state, batch, tables)[1]
    zeros = {k: np.zeros(m.shape, m.dtype) for k, m in metrics.items()}
    zeros.update(steps=np.int32(0), first_bad=np.int32(-1))
    return mesh_lib.put_global(mesh, zeros)

  return (lambda state, sums, batch: compiled(state, sums, batch, tables)), zero_sums


# ================================================================ metrics ===

class Progress:
  """Turns the summed metrics of some steps into scalars and a log line with
  each loss term, the rate and the ETA.

  A term t is reported from the metrics "t_loss_sum" / "t_pairs" (its mean
  per example: per positive pair, per triplet).
  """

  def __init__(self, start: int, total_steps: int, batch_size: int, unit: str):
    self.total, self.batch_size, self.unit = total_steps, batch_size, unit
    self.t0 = self.last_time = time.time()
    self.start = self.last_step = start

  def report(self, step: int, sums: Mapping) -> tuple[dict, str]:
    now = time.time()
    rate = (step - self.last_step) / max(now - self.last_time, 1e-9)
    overall = (step - self.start) / max(now - self.t0, 1e-9)
    self.last_step, self.last_time = step, now
    n = max(int(sums["steps"]), 1)
    scalars = {"loss": float(sums["loss"]) / n, "grad_norm": float(sums["grad_norm"]) / n,
               "steps_per_s": rate, f"{self.unit}_per_s": rate * self.batch_size}
    terms = [k[:-len("_loss_sum")] for k in sums if k.endswith("_loss_sum")]
    for t in terms:
      scalars[f"{t}_loss"] = float(sums[f"{t}_loss_sum"]) / max(float(sums[f"{t}_pairs"]), 1)
    line = (f"step {step:>6}/{self.total} | loss {scalars['loss']:.4f} ("
            + " ".join(f"{t} {scalars[f'{t}_loss']:.3f}" for t in terms)
            + f") | {rate:.2f} steps/s {rate * self.batch_size:.0f} {self.unit}/s | "
            f"ETA {_duration((self.total - step) / max(overall, 1e-9))}")
    return scalars, line


def write_scalars(writer: FileWriter, step: int, scalars: Mapping[str, float]) -> None:
  """{tag: value} as one TensorBoard event at `step` (tensorboardX sends each
  event through a multiprocessing queue, ~100 us an event whatever its size,
  so a log point writes one, not one a scalar)."""
  values = [v for tag, x in scalars.items() for v in tb_summary.scalar(tag, x).value]
  writer.add_summary(Summary(value=values), step)


def _tag(*parts: str) -> str:
  """A TensorBoard tag: "text->user (2+ posts)", "R@1" -> "text_to_user_2_posts", "R_at_1"."""
  clean = lambda p: re.sub(r"[^\w.]+", "_", p.replace("->", "_to_").replace("@", "_at_"))
  return "/".join(clean(p).strip("_") for p in parts)


def _duration(seconds: float) -> str:
  seconds = int(seconds)
  return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 \
      else f"{seconds // 60}m{seconds % 60:02d}s"


# ================================================================= guards ===

class Preemption:
  """Has the job been asked to stop? One process: SIGTERM (a preemptible VM's
  notice). Several: JAX's preemption sync point, reached by every process at
  the same step."""

  def __init__(self):
    self.requested, self._previous = False, None
    if jax.process_count() == 1:
      self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def reached(self, step: int) -> bool:
    if jax.process_count() == 1:
      return self.requested
    return multihost_utils.reached_preemption_sync_point(step)

  def release(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


# =================================================================== data ===

class DeviceBatches:
  """An iterator of this process's batches in the form the step takes, `depth`
  ahead of the loop, and their position (get_state()/set_state(): that of the
  batches handed out).

  Several processes: each batch becomes global arrays on the mesh, placed
  `depth` steps ahead so that its transfer runs while the steps before it do.
  One process: the rows stay NumPy arrays, placed by the step's own call
  (make_train_step's in_shardings), since placing them separately is a
  second dispatch a step. The host work is done in the calling thread between
  dispatches: a producer thread cost more than the work itself, the GIL
  passing back and forth once a batch (benchmarks/host_overhead.py,
  docs/scale.md)."""

  def __init__(self, dataset: grain.IterDataset, mesh: Mesh, depth: int = 2):
    self._source, self._depth = iter(dataset), depth
    self._place = (lambda rows: rows) if jax.process_count() == 1 else \
        functools.partial(mesh_lib.shard_batch, mesh)
    self._ahead = collections.deque()      # (batch, source state after it)
    self._state = self._source.get_state()

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    try:
      while len(self._ahead) <= self._depth:
        rows = next(self._source)
        self._ahead.append((self._place(rows), self._source.get_state()))
    except StopIteration:
      if not self._ahead:
        raise
    batch, self._state = self._ahead.popleft()
    return batch

  def get_state(self) -> dict:
    return self._state

  def set_state(self, state: Mapping) -> None:
    self._ahead.clear()
    self._source.set_state(state)
    self._state = state

  def close(self) -> None:
    """Drops the batches placed ahead."""
    self._ahead.clear()


# ================================================================ configs ===

def _flat(config: Mapping, prefix: str = "") -> dict:
  out = {}
  for k, v in config.items():
    if isinstance(v, Mapping):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
  return out


def check_resumable(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Refuses (ValueError naming the keys) to resume a workdir trained with a
  config that differs in anything but RESUMABLE_CHANGES."""
  if not os.path.exists(os.path.join(workdir, ckpt_lib.CONFIG_FILE)):
    return
  old = _flat(ckpt_lib.load_config(workdir).to_dict())
  new = _flat(json.loads(config.to_json_best_effort()))
  safe = lambda k: any(re.fullmatch(p.replace(".", r"\.").replace("*", r"[^.]+"), k)
                       for p in RESUMABLE_CHANGES)
  changed = sorted(k for k in old.keys() | new.keys()
                   if old.get(k) != new.get(k) and not safe(k))
  if changed:
    raise ValueError(
        f"{workdir} was trained with another config ({', '.join(changed[:8])}"
        f"{' ...' if len(changed) > 8 else ''} differ); use a new --workdir, or the "
        f"workdir's own settings")


# =================================================================== loop ===

def report(name: str, evaluator, results: Mapping, workdir: str, suffix: str = "") -> None:
  """Prints an evaluator's table and writes WORKDIR/eval_<name><suffix>.json
  (process 0 only)."""
  if jax.process_index() == 0:
    print(f"\nResults of {name} on the {evaluator.config.split} split:\n"
          f"{evaluator.format(results)}", flush=True)
    with open(os.path.join(workdir, f"eval_{name}{suffix}.json"), "w") as f:
      json.dump(results, f, indent=1)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, data_dir: str,
                       metadata: Mapping):
  """Trains (or resumes) in `workdir` on prepared data, then runs the final
  evaluators; returns (state, {evaluator name: results})."""
  lead = jax.process_index() == 0
  check_resumable(config, workdir)
  mesh = mesh_lib.make_mesh(config.get("num_devices"))
  n_dev, n_proc = mesh.devices.size, jax.process_count()
  if config.batch_size % n_dev:
    raise ValueError(f"batch_size {config.batch_size} is not divisible by the "
                     f"{n_dev} devices of the mesh")
  exp = Experiment(config, data_dir, metadata, workdir)
  steps_per_epoch = exp.data.num_train // config.batch_size
  if steps_per_epoch == 0:
    raise ValueError(f"the training set ({exp.data.num_train} {exp.data.unit}) is smaller "
                     f"than one batch of {config.batch_size}")
  stages = exp.stages(steps_per_epoch)
  total_steps = stages[-1].end_step
  evaluators = exp.evaluators(mesh)      # errors stop the run before training
  dataset = exp.data.train_dataset(config.batch_size // n_proc, jax.process_index(), n_proc)
  feed = exp.data.feed(mesh)
  data_iter = DeviceBatches(dataset, mesh)
  fresh_position = data_iter.get_state()
  first = next(data_iter)
  example = exp.data.host_inputs(jax.tree.map(
      lambda x: np.asarray(x.addressable_data(0) if isinstance(x, jax.Array) else x)[:1], first))
  variables = exp.init_variables(jax.random.key(config.seed), example)
  stage_of = lambda step: next((i for i, s in enumerate(stages) if step <= s.end_step),
                               len(stages) - 1)

  def state_for(stage: Stage, variables: Mapping, step: int = 0) -> TrainState:
    """A train state of `stage` at `step`, with a fresh optimizer."""
    state = create_train_state(variables, make_optimizer(config, steps_per_epoch, stage.frozen))
    return jax.device_put(state.replace(step=step), NamedSharding(mesh, P()))

  os.makedirs(workdir, exist_ok=True)
  if lead:
    with open(os.path.join(workdir, ckpt_lib.CONFIG_FILE), "w") as f:
      f.write(config.to_json_best_effort(indent=1))
  ckpts = ckpt_lib.Checkpoints(workdir, config.keep_checkpoints)
  start = ckpts.latest_step() or 0
  state = state_for(stages[stage_of(max(start, 1))], variables)
  steps, zero_sums = zip(*[make_train_step(exp.loss_fn(s), mesh, config.seed, feed)
                           for s in stages])
  zeros = zero_sums[0](state, first)     # the metric sums of no step
  if start:
    state, position = ckpts.restore(start, state)
    data_iter.set_state(position)
    if lead:
      print(f"Resuming from the checkpoint at step {start} in {workdir}", flush=True)
  else:
    data_iter.set_state(fresh_position)
  if lead:
    print(f"Training {total_steps // steps_per_epoch} epochs x {steps_per_epoch} steps of "
          f"{config.batch_size} {exp.data.unit} on {n_dev} device(s), {n_proc} process(es); "
          f"data {data_dir}", flush=True)

  writer = FileWriter(workdir) if lead else None
  progress = Progress(start, total_steps, config.batch_size, exp.data.unit)
  # The loop's settings as plain values (a ConfigDict lookup costs microseconds).
  periodic = {n: config.evals[n].every_steps for n in evaluators if config.evals[n].every_steps}
  log_every, checkpoint_every = config.log_every_steps, config.checkpoint_every_steps
  selector = config.get("best")
  preemption = Preemption()
  sums, last_saved, pending = zeros, start or None, None
  one_in_flight = n_dev > 1 and jax.default_backend() == "cpu"     # see the module

  def write(step: int, scalars: Mapping, line: str) -> None:
    if lead:
      print(line, flush=True)
      write_scalars(writer, step, {f"train/{k}": v for k, v in scalars.items()})

  try:
    for step in range(start + 1, total_steps + 1):
      stage = stage_of(step)
      if stage and step == stages[stage - 1].end_step + 1:
        state = state_for(stages[stage], state.variables(), state.step)
      state, sums = steps[stage](state, sums, next(data_iter))
      if one_in_flight:
        jax.block_until_ready(sums)
      if pending:            # the last log point's line, written while this step runs
        write(*pending)
        pending = None
      preempted = preemption.reached(step)
      due = [n for n, every in periodic.items() if step % every == 0 or step == total_steps]
      save = step % checkpoint_every == 0 or step == total_steps or preempted or selector in due
      if step % log_every == 0 or step == total_steps or save or due:
        host = jax.device_get(sums)
        if host["first_bad"] >= 0:
          raise TrainingStopped(
              f"non-finite loss or gradient norm at step {int(host['first_bad'])}; stopped "
              f"before saving it. The last good checkpoint (step {last_saved}) is kept.")
        if step % log_every == 0 or step == total_steps:
          pending = (step, *progress.report(step, host))
          sums = zeros
          if save or due:
            write(*pending)
            pending = None
      score = None
      for name in due:
        results = evaluators[name].run(state.variables())
        value = evaluators[name].score(results)
        score = value if name == selector else score
        if lead:
          with open(os.path.join(workdir, VALIDATION_LOG), "a") as f:
            f.write(json.dumps({"step": step, "evaluator": name, "score": value,
                                "results": results}) + "\n")
          write_scalars(writer, step, {_tag(name, "selection_score"): value} | {
              _tag(name, *key): v for key, v in evaluators[name].scalars(results).items()})
          best = ckpts.best_score()
          status = ("new best" if best is None or value <= best else
                    f"best {best:.4f} at step {ckpts.best_step()}") \
              if name == selector else "not used for selection"
          print(f"{name} at step {step}: score {value:.4f} ({status})", flush=True)
      if save:
        ckpts.save(step, state, data_iter.get_state(), score)
        last_saved = step
      if preempted:
        if lead:
          print(f"Stopped by SIGTERM after step {step}; checkpoint saved. Run the "
                "same command to continue.", flush=True)
        return state, None
    # The paper's protocol: the final evaluators rank the best state on validation.
    final, best = state, ckpts.best_step()
    ckpts.wait()
    if best is not None and best != int(state.step):
      if lead:
        print(f"\nThe best checkpoint on {config.best!r} is step {best} (score "
              f"{ckpts.best_score():.4f}); evaluating it.", flush=True)
      final = ckpts.restore(best, state, with_data=False)[0]
  finally:
    preemption.release()
    ckpts.close()
    data_iter.close()
    if writer is not None:
      writer.flush()

  # ============================================================ evaluate ===
  results = {}
  for name, evaluator in evaluators.items():
    if config.evals[name].every_steps:
      continue
    results[name] = evaluator.run(final.variables())
    report(name, evaluator, results[name], workdir)
    if lead:
      write_scalars(writer, total_steps, {_tag(name, *key): value for key, value
                                          in evaluator.scalars(results[name]).items()})
  if writer is not None:
    writer.close()
  return state, results
