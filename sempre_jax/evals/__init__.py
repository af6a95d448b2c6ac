"""Which evaluators exist, and how does a run use them?

An evaluator is a module of this package, registered by one line in REGISTRY
(`config.evals.<name>.type` -> its import path), with a `build(config, exp,
mesh)` function returning an object that satisfies `Evaluator`. A config
names any number of them in `config.evals`, each with its own settings:

  config.evals.val  = {"type": "retrieval", "split": "validation", "every_steps": 100, ...}
  config.evals.test = {"type": "retrieval", "split": "test", "every_steps": 0, ...}
  config.best = "val"     # whose score selects the best checkpoint ("" none)

An evaluator with `every_steps` > 0 runs during training, every
`every_steps` steps and at the last step (its score and results appended to
WORKDIR/validation.jsonl and TensorBoard; `config.best` selects the best
checkpoint by it), and not after training. One with `every_steps` 0 never
runs during training: it runs once after training, on the best checkpoint
when `config.best` names one (else the final state), its table printed and
its results written to WORKDIR/eval_<name>.json. Evaluators are built once
per run: their compiled functions serve every call.

  retrieval       exact ranks of the retrieval tasks (text->user, image->text,
                  image->user and the reverse directions), for "posts" models.
  recommendation  per-user P@K, R@K and AUC of held-out actions under each
                  paper's protocol, for "triplets" models.
  interests       the paper's user-interest prediction: a linear SVM on the
                  user vectors, macro-F1 beside Avg-Text / Avg-Image.
"""

import importlib
from collections.abc import Mapping
from typing import Any, Protocol

REGISTRY: dict[str, Any] = {
    "retrieval": "sempre_jax.evals.retrieval",
    "recommendation": "sempre_jax.evals.recommendation",
    "interests": "sempre_jax.evals.interests",
}


class Evaluator(Protocol):
  """What `build` returns."""

  def run(self, variables: Mapping) -> dict:
    """Results (JSON-able) of the model with `variables` ({"params", ...})."""

  def score(self, results: Mapping) -> float:
    """The checkpoint-selection score of `results`: lower is better."""

  def format(self, results: Mapping) -> str:
    """A readable table of `results`."""

  def scalars(self, results: Mapping) -> dict[tuple[str, ...], float]:
    """{(task, metric): value} for TensorBoard."""


def get(kind: str):
  """The evaluator module registered as `kind` (config.evals.<name>.type)."""
  if kind not in REGISTRY:
    raise ValueError(f"evaluator type must be one of {sorted(REGISTRY)}, got {kind!r}")
  module = REGISTRY[kind]
  if isinstance(module, str):
    module = REGISTRY[kind] = importlib.import_module(module)
  return module


def register(kind: str, module) -> None:
  """Adds an evaluator type (any object with a `build(config, exp, mesh)`)."""
  REGISTRY[kind] = module
