"""What did a training workdir produce, and how is a checkpoint of it used again?

A workdir written by launch/train.py holds config.json, the checkpoints and,
for the embedded corpus, the prepared data (WORKDIR/data). `restore` rebuilds
the run's Experiment (model, data, evaluators) around a checkpoint's
variables; `evaluate` re-runs the config's final evaluators on it.
"""

import jax
import ml_collections

from input_pipeline import embedded, records
from sempre_jax import checkpoints, evals, mesh as mesh_lib, train
from sempre_jax.experiment import Experiment


def data_dir_of(config, workdir: str) -> str:
  """The prepared data a workdir was trained on."""
  return config.data.dir or embedded.data_dir(workdir)


def restore(workdir: str, checkpoint: str = "best"):
  """(experiment, variables as host arrays, step) of a workdir's checkpoint:
  "best" (on validation; the latest when the run kept no score), "latest" or
  a step number."""
  config = checkpoints.load_config(workdir)
  step = checkpoints.find_step(workdir, checkpoint)
  data_dir = data_dir_of(config, workdir)
  exp = Experiment(config, data_dir, records.read_metadata(data_dir), workdir)
  return exp, checkpoints.restore_variables(workdir, step), step


def run_evaluator(workdir: str, checkpoint: str, block: dict) -> tuple:
  """(evaluator, results, step): an evaluator of settings `block` (a
  config.evals entry, e.g. {"type": "interests", "folds": 5}) on a checkpoint."""
  exp, variables, step = restore(workdir, checkpoint)
  evaluator = evals.get(block["type"]).build(
      ml_collections.ConfigDict(block), exp, mesh_lib.make_mesh(exp.config.get("num_devices")))
  return evaluator, evaluator.run(variables), step


def evaluate(workdir: str, checkpoint: str = "best") -> dict:
  """Re-runs the final evaluators (every_steps 0) of a workdir's config on a
  checkpoint; writes WORKDIR/eval_<name>_stepN.json (once every evaluator has
  run: a failure writes nothing) and returns {name: results}."""
  exp, variables, step = restore(workdir, checkpoint)
  if jax.process_index() == 0:
    print(f"Evaluating the checkpoint at step {step} of {workdir}", flush=True)
  mesh = mesh_lib.make_mesh(exp.config.get("num_devices"))
  evaluators = {name: e for name, e in exp.evaluators(mesh).items()
                if not exp.config.evals[name].every_steps}
  out = {name: evaluator.run(variables) for name, evaluator in evaluators.items()}
  for name, evaluator in evaluators.items():
    train.report(name, evaluator, out[name], workdir, suffix=f"_step{step}")
  return out
