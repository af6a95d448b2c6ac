"""Where is a run's state kept, and how is it read back?

One orbax CheckpointManager per workdir (WORKDIR/checkpoints): each
checkpoint holds the train state (parameters, optimizer state, model state)
and the data iterator's position, so a resumed run sees exactly the batches
an uninterrupted one would. Checkpoints written at a validation step carry
its score (lower is better); the manager keeps the latest `keep` checkpoints
and the best-scoring one (a tie goes to the later step), and saves
asynchronously (the host copy is taken before `save` returns, so training
goes on while the files are written).

Reading back, whatever devices wrote a checkpoint: `read_state` returns host
arrays; `restore_variables` finds the best, latest or a given step of a
workdir.
"""

import json
import os
from collections.abc import Mapping

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint import checkpoint_managers

CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"


def _score(metrics: Mapping) -> float:
  return metrics["score"]


class Checkpoints:
  """The checkpoints of a workdir: save, restore, latest and best step."""

  def __init__(self, workdir: str, keep: int = 3):
    policy = checkpoint_managers.AnyPreservationPolicy([
        checkpoint_managers.LatestN(keep),
        checkpoint_managers.BestN(get_metric_fn=_score, reverse=True, n=1,
                                  keep_checkpoints_without_metrics=False)])
    self.manager = ocp.CheckpointManager(
        os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR),
        options=ocp.CheckpointManagerOptions(preservation_policy=policy, best_fn=_score,
                                             best_mode="min", create=True))
    # Scores of the saved steps, those being written asynchronously included
    # (orbax writes the metrics files, as best_fn asks, when a save finishes).
    self.scores = {step: _score(m) for step in self.manager.all_steps()
                   if (m := self.manager.metrics(step)) is not None}

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def best_step(self) -> int | None:
    """The step with the lowest validation score, the later of equal ones
    (None: no scored checkpoint)."""
    return max(self.scores, key=lambda s: (-self.scores[s], s), default=None)

  def best_score(self) -> float | None:
    step = self.best_step()
    return None if step is None else self.scores[step]

  def save(self, step: int, state, data_state: Mapping, score: float | None = None) -> None:
    """Saves (asynchronously) the state and the iterator position at `step`,
    with its validation score when it has one."""
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(dict(data_state))),
        metrics=None if score is None else {"score": float(score)}, force=True)
    if score is not None:
      self.scores[step] = float(score)

  def restore(self, step: int, abstract_state, with_data: bool = True):
    """(state laid out like `abstract_state`, iterator position or None)."""
    args = {"state": ocp.args.StandardRestore(abstract_state)}
    if with_data:
      args["data"] = ocp.args.JsonRestore()
    restored = self.manager.restore(step, args=ocp.args.Composite(**args))
    return restored["state"], restored["data"] if with_data else None

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def read_state(path: str) -> dict:
  """A saved train state as host arrays, whatever devices wrote it (each array
  is read onto this process's first device)."""
  path = os.path.abspath(path)
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  abstract = jax.tree.map(
      lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
      ocp.StandardCheckpointHandler().metadata(epath.Path(path)).tree)
  return jax.tree.map(np.asarray, ocp.StandardCheckpointer().restore(path, abstract))


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a workdir was trained with (WORKDIR/config.json)."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: {workdir} is not a workdir written by "
                            "launch/train.py")
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def find_step(workdir: str, checkpoint: str = "best") -> int:
  """The step of "best" (the best on validation; the latest when the run
  kept no score), "latest" or a step number, among a workdir's checkpoints."""
  if checkpoint not in ("best", "latest") and not checkpoint.isdigit():
    raise ValueError(f"checkpoint must be 'best', 'latest' or a step number, "
                     f"got {checkpoint!r}")
  directory = os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"{directory} not found: {workdir} has no checkpoint")
  ckpts = Checkpoints(workdir)
  try:
    steps = list(ckpts.manager.all_steps())
    step = (int(checkpoint) if checkpoint.isdigit()
            else (checkpoint == "best" and ckpts.best_step()) or ckpts.latest_step())
  finally:
    ckpts.manager.close()
  if step is None or step not in steps:
    raise ValueError(f"no checkpoint {checkpoint!r} in {directory} (has {sorted(steps)})")
  return step


def restore_variables(workdir: str, step: int) -> dict:
  """The model variables ({"params", ...}) of a workdir's checkpoint at `step`,
  as host arrays."""
  state = read_state(os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR, str(step),
                                  "state"))
  return {"params": state["params"], **(state.get("model_state") or {})}
