"""How does one step run over all devices, and how is a run resumed?

The step is per-device code with named-axis collectives (the pmap model),
compiled with `jax.jit` over a ("data",) mesh through `jax.shard_map`: each
device runs the task's loss on its shard of the global batch (DU2MCE
all-gathers the candidate embeddings so negatives come from the global batch;
the family models' triplets carry their negatives; BatchNorm statistics are
averaged over the mesh). Parameters are replicated, so `jax.grad` of the local
loss share already returns the psum of the per-device gradients: the gradient
of the global-batch loss, identical to one device on the same batch.

A run is resumable: checkpoints hold the model, the optimizer and the data
iterator; validation every N steps keeps the best state, and the test split is
evaluated with it (sections below: train state, step, checkpoints, guards,
metrics, data, loop).
"""

import dataclasses
import json
import os
import re
import signal
import time
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from etils import epath
from flax.training import train_state
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from tensorboardX import SummaryWriter

from input_pipeline import records, synthetic
from sempre_jax import mesh as mesh_lib, tasks
from sempre_jax.evals import retrieval

CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"
BEST_DIR = "checkpoints_best"     # the best checkpoint on validation (one)
VALIDATION_LOG = "validation.jsonl"


# ============================================================ train state ===

class TrainState(train_state.TrainState):
  """Parameters, optimizer state and the model's other variables ({} or
  {"batch_stats": ...}: BatchNorm statistics, updated by the step)."""
  model_state: Any = None

  def variables(self) -> dict:
    return {"params": self.params, **self.model_state}


def make_optimizer(config: ml_collections.ConfigDict, steps_per_epoch: int,
                   stage_starts: tuple[int, ...] = (0,)):
  """config.optimizer: "adam" (default) or "sgd" (with config.momentum), plus
  config.weight_decay (decoupled, 0 by default); the learning rate is divided
  by `lr_decay` every `lr_decay_epochs`, counted from the start of each
  training stage (the steps in `stage_starts`)."""
  decay = optax.exponential_decay(
      config.learning_rate, transition_steps=config.lr_decay_epochs * steps_per_epoch,
      decay_rate=1.0 / config.lr_decay, staircase=True)
  starts = jnp.asarray(stage_starts)
  schedule = lambda count: decay(count - jnp.max(jnp.where(starts <= count, starts, 0)))
  name = config.get("optimizer", "adam")
  if name == "adam":
    tx = optax.adam(schedule)
  elif name == "sgd":
    tx = optax.sgd(schedule, momentum=config.get("momentum") or None)
  else:
    raise ValueError(f"optimizer must be adam or sgd, got {name!r}")
  wd = config.get("weight_decay", 0.0)
  return optax.chain(optax.add_decayed_weights(wd), tx) if wd else tx


def create_train_state(variables: Mapping, tx: optax.GradientTransformation) -> TrainState:
  """A train state from initialised model variables (replicated later by the mesh)."""
  variables = dict(variables)
  params = variables.pop("params")
  return TrainState.create(apply_fn=None, params=params, tx=tx, model_state=variables)


# =================================================================== step ===

def make_train_step(loss_fn, mesh: Mesh, frozen: tuple[str, ...] = (), seed: int = 0):
  """jit(shard_map(step)): (state, global batch) -> (state, summed metrics).

  loss_fn(variables, local batch, rng) -> (this device's share of the global
  loss, psum'ed metrics, model-state updates); the dropout rng differs per
  step and device. Parameters of the top-level modules named in `frozen` do
  not move.
  """

  def per_device_step(state, batch):
    rng = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), state.step),
                             jax.lax.axis_index(mesh_lib.AXIS))

    def objective(params):
      loss, metrics, updates = loss_fn({"params": params, **state.model_state}, batch, rng)
      return loss, (metrics, updates)

    grads, (metrics, updates) = jax.grad(objective, has_aux=True)(state.params)
    metrics["grad_norm"] = optax.tree.norm(grads)
    steps, opt_state = state.tx.update(grads, state.opt_state, state.params)
    steps = {k: jax.tree.map(jnp.zeros_like, v) if k in frozen else v for k, v in steps.items()}
    return state.replace(step=state.step + 1, params=optax.apply_updates(state.params, steps),
                         opt_state=opt_state, model_state={**state.model_state, **updates}), metrics

  step = jax.shard_map(per_device_step, mesh=mesh, in_specs=(P(), P(mesh_lib.AXIS)),
                       out_specs=(P(), P()))
  return jax.jit(step, donate_argnums=0)


# ============================================================ checkpoints ===

class Checkpointer:
  """Model state and data-iterator state, saved together in workdir/checkpoints."""

  def __init__(self, workdir: str, every_steps: int, keep: int):
    self.manager = ocp.CheckpointManager(
        os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, save_interval_steps=every_steps, create=True))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, data_state: Mapping, force: bool = False) -> None:
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(dict(data_state))),
        force=force)

  def restore(self, step: int, abstract_state):
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
    return restored["state"], restored["data"]

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


class BestCheckpoint:
  """The state with the lowest validation score so far (the latest of equal
  ones), in workdir/checkpoints_best (one checkpoint, with its validation results)."""

  def __init__(self, workdir: str):
    self.manager = ocp.CheckpointManager(
        os.path.join(os.path.abspath(workdir), BEST_DIR),
        options=ocp.CheckpointManagerOptions(max_to_keep=1, create=True))
    self.step = self.manager.latest_step()
    self.score = (self.manager.restore(self.step, args=ocp.args.Composite(
        results=ocp.args.JsonRestore()))["results"]["score"]
        if self.step is not None else float("inf"))

  def offer(self, step: int, state, score: float, results: Mapping) -> bool:
    """Saves `state` when `score` is at least as good as the best so far (a
    tie goes to the later, longer-trained state); True when it did."""
    if not score <= self.score or (self.step is not None and step <= self.step):
      return False
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        results=ocp.args.JsonSave({"step": step, "score": score, **results})), force=True)
    self.step, self.score = step, score
    return True

  def restore(self, abstract_state):
    return self.manager.restore(self.step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state)))["state"]

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


# ================================================================= guards ===

class TrainingStopped(RuntimeError):
  """Training cannot go on (e.g. a non-finite loss); the message says why."""


class Preemption:
  """SIGTERM (a preemptible VM's notice) -> finish the step, checkpoint, exit 0."""

  def __init__(self):
    self.requested = False
    self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def agreed(self) -> bool:
    """True when any process of the job was asked to stop."""
    if jax.process_count() == 1:
      return self.requested
    return bool(multihost_utils.process_allgather(np.array(self.requested)).any())

  def release(self) -> None:
    signal.signal(signal.SIGTERM, self._previous)


def check_finite(step: int, metrics: Mapping, last_good: int | None) -> None:
  """Raises TrainingStopped when the loss or the gradient norm is not finite."""
  bad = [k for k in ("loss", "grad_norm") if not np.isfinite(float(metrics[k]))]
  if bad:
    raise TrainingStopped(
        f"non-finite {' and '.join(bad)} at step {step}; stopped before saving it. "
        f"The last good checkpoint (step {last_good}) is kept.")


# ================================================================ metrics ===

@dataclasses.dataclass
class Progress:
  """Sums metrics between log lines and reports each loss term, rate and ETA.

  A term t is reported from the metrics "t_loss_sum" / "t_pairs" (its mean
  per example: per positive pair, per triplet).
  """
  total_steps: int
  batch_size: int
  unit: str = "posts"

  def __post_init__(self):
    self.sums, self.steps, self.t0 = {}, 0, time.time()
    self.run_t0, self.run_steps = self.t0, 0

  def add(self, metrics: Mapping) -> None:
    for k, v in metrics.items():
      self.sums[k] = self.sums.get(k, 0.0) + float(v)
    self.steps += 1

  def summary(self, step: int) -> tuple[dict, str]:
    now = time.time()
    rate = self.steps / max(now - self.t0, 1e-9)
    self.run_steps += self.steps
    overall = self.run_steps / max(now - self.run_t0, 1e-9)
    eta = (self.total_steps - step) / max(overall, 1e-9)
    s = self.sums
    scalars = {"loss": s["loss"] / self.steps, "grad_norm": s["grad_norm"] / self.steps,
               "steps_per_s": rate, f"{self.unit}_per_s": rate * self.batch_size}
    terms = [k[:-len("_loss_sum")] for k in s if k.endswith("_loss_sum")]
    for t in terms:
      scalars[f"{t}_loss"] = s[f"{t}_loss_sum"] / max(s[f"{t}_pairs"], 1)
    line = (f"step {step:>6}/{self.total_steps} | loss {scalars['loss']:.4f} ("
            + " ".join(f"{t} {scalars[f'{t}_loss']:.3f}" for t in terms)
            + f") | {rate:.2f} steps/s {rate * self.batch_size:.0f} {self.unit}/s | "
            f"ETA {_duration(eta)}")
    self.sums, self.steps, self.t0 = {}, 0, now
    return scalars, line


def _tag(*parts: str) -> str:
  """A TensorBoard tag: "text->user (2+ posts)", "R@1" -> "text_to_user_2_posts", "R_at_1"."""
  clean = lambda p: re.sub(r"[^\w.]+", "_", p.replace("->", "_to_").replace("@", "_at_"))
  return "/".join(clean(p).strip("_") for p in parts)


def _duration(seconds: float) -> str:
  seconds = int(seconds)
  return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 \
      else f"{seconds // 60}m{seconds % 60:02d}s"


# =================================================================== data ===

def dataset(config: ml_collections.ConfigDict, workdir: str) -> tuple[str, dict]:
  """(data_dir, metadata): config.data.dir, or the embedded corpus in workdir/data."""
  if config.data.dir:
    return config.data.dir, records.read_metadata(config.data.dir)
  data_dir = os.path.join(workdir, "data")
  spec = synthetic.CorpusSpec(**config.data.embedded.to_dict())
  if not os.path.exists(os.path.join(data_dir, records.METADATA_FILE)):
    if jax.process_index() == 0:
      t0 = time.time()
      meta = synthetic.write_corpus(spec, data_dir, config.data.split_fractions.to_dict(),
                                    config.data.num_shards)
      counts = {s: m["num_posts"] for s, m in meta["splits"].items()}
      print(f"Wrote the embedded corpus to {data_dir} in {time.time() - t0:.1f}s: "
            f"{spec.num_users} users, {meta['num_images']} images, posts {counts}",
            flush=True)
    multihost_utils.sync_global_devices("embedded corpus")
  metadata = records.read_metadata(data_dir)
  wanted = dataclasses.asdict(spec)
  if metadata.get("spec") != wanted:
    raise ValueError(f"{data_dir} holds an embedded corpus made with other settings "
                     f"({metadata.get('spec')}); use a new --workdir for {wanted}")
  return data_dir, metadata


# =================================================================== loop ===

def report_eval(task, variables, split: str, mesh: Mesh, path: str) -> dict:
  """Evaluates `variables` on `split`; process 0 prints the table and writes `path`."""
  results = task.evaluator(split, mesh).run(variables)
  if jax.process_index() == 0:
    print(f"\nResults on the {split} split:\n{task.format(results)}", flush=True)
    retrieval.write_results(results, path)
  return results


def load_config(workdir: str) -> ml_collections.ConfigDict:
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: {workdir} is not a workdir written by "
                            "launch/train.py")
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def read_state(path: str) -> dict:
  """A saved train state as host arrays, whatever devices wrote it (each array
  is read onto this process's first device)."""
  path = os.path.abspath(path)
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  abstract = jax.tree.map(
      lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
      ocp.StandardCheckpointHandler().metadata(epath.Path(path)).tree)
  return jax.tree.map(np.asarray, ocp.StandardCheckpointer().restore(path, abstract))


def restore_variables(workdir: str, checkpoint: str = "best"):
  """(config, task, variables, step) of a workdir's checkpoint.

  checkpoint: "best" (the best on validation; the latest when the run kept no
  best), "latest" or a step number. Variables come back as host arrays.
  """
  if checkpoint not in ("best", "latest") and not checkpoint.isdigit():
    raise ValueError(f"checkpoint must be 'best', 'latest' or a step number, "
                     f"got {checkpoint!r}")
  config = load_config(workdir)
  data_dir, metadata = dataset(config, workdir)
  steps_in = lambda d: (sorted(int(s) for s in os.listdir(d) if s.isdigit())
                        if os.path.isdir(d) else [])
  directory = os.path.join(os.path.abspath(workdir), BEST_DIR)
  if checkpoint != "best" or not steps_in(directory):
    directory = os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)
  steps = steps_in(directory)
  if not steps or (checkpoint.isdigit() and int(checkpoint) not in steps):
    raise ValueError(f"no checkpoint {checkpoint!r} in {directory} (has {steps})")
  step = int(checkpoint) if checkpoint.isdigit() else steps[-1]
  state = read_state(os.path.join(directory, str(step), "state"))
  task = tasks.build(config, data_dir, metadata, workdir)
  return config, task, {"params": state["params"], **(state.get("model_state") or {})}, step


def restore_checkpoint(workdir: str, checkpoint: str = "best"):
  """(config, model, data_dir, metadata, params, step) of a DU2MCE workdir's checkpoint."""
  config, task, variables, step = restore_variables(workdir, checkpoint)
  if not isinstance(task, tasks.Retrieval):
    raise ValueError(f"{workdir} holds a {config.model.name} model; this tool needs DU2MCE")
  return config, task.model, task.data_dir, task.metadata, variables["params"], step


def evaluate_checkpoint(workdir: str, checkpoint: str = "best") -> dict:
  """Re-evaluates a checkpoint ("best", "latest" or a step) of a training workdir."""
  config, task, variables, step = restore_variables(workdir, checkpoint)
  print(f"Evaluating the checkpoint at step {step} of {workdir}", flush=True)
  return report_eval(task, variables, config.eval.split,
                     mesh_lib.make_mesh(config.get("num_devices")),
                     os.path.join(workdir, f"eval_{config.eval.split}_step{step}.json"))


class Validation:
  """Validation every config.eval.every_steps: the task's selection score
  (lower is better), logged, and the best state kept."""

  def __init__(self, config, task, stages, mesh, workdir: str, writer):
    self.task, self.stages, self.every = task, stages, config.eval.every_steps
    self.evaluator = None
    if self.every:
      try:
        self.evaluator = task.evaluator("validation", mesh)
      except ValueError as e:          # no validation posts / actions
        if jax.process_index() == 0:
          print(f"No validation ({e}): no best checkpoint is kept; the test split is "
                "evaluated with the final parameters.", flush=True)
        self.every = 0
    self.best = BestCheckpoint(workdir)
    self.log_path, self.writer = os.path.join(workdir, VALIDATION_LOG), writer

  def due(self, step: int, total_steps: int) -> bool:
    return bool(self.every) and (step % self.every == 0 or step == total_steps)

  def __call__(self, step: int, state) -> None:
    results = self.evaluator.run(state.variables())
    score = self.task.selection_score(results, self.stages)
    improved = self.best.offer(step, state, score, results)
    if jax.process_index() == 0:
      with open(self.log_path, "a") as f:
        f.write(json.dumps({"step": step, "score": score, "results": results}) + "\n")
      self.writer.add_scalar("validation/selection_score", score, step)
      for key, value in self.task.scalars(results).items():
        self.writer.add_scalar(_tag("validation", *key), value, step)
      status = ("new best" if improved
                else f"best {self.best.score:.4f} at step {self.best.step}")
      print(f"validation at step {step}: score {score:.4f} ({status})", flush=True)

  def close(self) -> None:
    self.best.close()


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str):
  """Trains (or resumes) in `workdir`, then evaluates; returns (state, eval results)."""
  os.makedirs(workdir, exist_ok=True)
  lead = jax.process_index() == 0
  if lead:
    with open(os.path.join(workdir, CONFIG_FILE), "w") as f:
      f.write(config.to_json_best_effort(indent=1))
  data_dir, metadata = dataset(config, workdir)
  mesh = mesh_lib.make_mesh(config.get("num_devices"))
  n_dev, n_proc = mesh.devices.size, jax.process_count()
  if config.batch_size % n_dev:
    raise ValueError(f"batch_size {config.batch_size} is not divisible by the "
                     f"{n_dev} devices of the mesh")
  task = tasks.build(config, data_dir, metadata, workdir)
  steps_per_epoch = task.num_train // config.batch_size
  if steps_per_epoch == 0:
    raise ValueError(f"the training set ({task.num_train} {task.unit}) is smaller than "
                     f"one batch of {config.batch_size}")
  stages = task.stages(steps_per_epoch)
  total_steps = stages[-1].end_step

  data_iter = task.train_iterator(config.batch_size // n_proc, jax.process_index(), n_proc)
  tx = make_optimizer(config, steps_per_epoch,
                      tuple([0] + [s.end_step for s in stages[:-1]]))
  fresh_data_state = data_iter.get_state()
  example = jax.tree.map(lambda x: x[:1], next(data_iter))
  state = create_train_state(task.init_variables(jax.random.key(config.seed), example), tx)
  state = jax.device_put(state, NamedSharding(mesh, P()))

  ckpt = Checkpointer(workdir, config.checkpoint_every_steps, config.keep_checkpoints)
  start = ckpt.latest_step()
  if start is not None:
    state, data_state = ckpt.restore(start, state)
    data_iter.set_state(data_state)
    if lead:
      print(f"Resuming from the checkpoint at step {start} in {workdir}", flush=True)
  else:
    start = 0
    data_iter.set_state(fresh_data_state)
  if lead:
    print(f"Training {total_steps // steps_per_epoch} epochs x {steps_per_epoch} steps of "
          f"{config.batch_size} {task.unit} on {n_dev} device(s), {n_proc} process(es); "
          f"data {data_dir}", flush=True)

  train_steps = [make_train_step(task.loss_fn(s), mesh, s.frozen, config.seed)
                 for s in stages]
  writer = SummaryWriter(workdir) if lead else None
  progress = Progress(total_steps, config.batch_size, task.unit)
  validation = Validation(config, task, stages, mesh, workdir, writer)
  preemption = Preemption()
  try:
    for step in range(start + 1, total_steps + 1):
      stage = next(i for i, s in enumerate(stages) if step <= s.end_step)
      state, metrics = train_steps[stage](state, mesh_lib.shard_batch(mesh, next(data_iter)))
      check_finite(step, metrics, ckpt.latest_step())
      progress.add(metrics)
      if step % config.log_every_steps == 0 or step == total_steps:
        scalars, line = progress.summary(step)
        if lead:
          print(line, flush=True)
          for k, v in scalars.items():
            writer.add_scalar(f"train/{k}", v, step)
      if validation.due(step, total_steps):
        validation(step, state)
      preempted = preemption.agreed()
      ckpt.save(step, state, data_iter.get_state(),
                force=step == total_steps or preempted)
      if preempted:
        if lead:
          print(f"Stopped by SIGTERM after step {step}; checkpoint saved. Run the "
                "same command to continue.", flush=True)
        return state, None
    # The paper's protocol: the test split is evaluated with the best state on validation.
    best, final = validation.best.step, state
    if best is not None and best != int(state.step):
      if lead:
        print(f"\nThe best checkpoint on validation is step {best} (score "
              f"{validation.best.score:.4f}); evaluating it.", flush=True)
      final = validation.best.restore(state)
  finally:
    preemption.release()
    validation.close()
    ckpt.close()
    if writer is not None:
      writer.flush()

  # ============================================================ evaluate ===
  results = report_eval(task, final.variables(), config.eval.split, mesh,
                        os.path.join(workdir, f"eval_{config.eval.split}.json"))
  if lead:
    for key, value in task.scalars(results).items():
      writer.add_scalar(_tag(config.eval.split, *key), value, total_steps)
    writer.close()
  return state, results
