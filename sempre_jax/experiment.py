"""What does a config build, given prepared data?

An `Experiment` ties a config to a prepared dataset: the registered model
(config.model.name, sempre_jax/models), its Flax module sized for the data,
the data as that model sees it (sempre_jax/data.py), the training stages and
the evaluators (config.evals, sempre_jax/evals). The trainer, the evaluation
of a saved checkpoint and the analysis tools all start from one.

Training may run in stages (config.stages, each a share of num_epochs): a
stage overrides loss settings (e.g. DU2MCE's l1, l2) and freezes the named
top-level parameter collections (towers); the Bridging-Modality baseline
trains text-user, then image-text with the text and user towers frozen.
"""

import dataclasses
from collections.abc import Mapping

import ml_collections
from jax.sharding import Mesh

from sempre_jax import data as data_lib, evals, losses, mesh as mesh_lib, models


@dataclasses.dataclass(frozen=True)
class Stage:
  """A phase of training: steps up to `end_step`, with these loss settings and
  these towers' parameters frozen."""
  end_step: int
  loss: ml_collections.ConfigDict
  frozen: tuple[str, ...] = ()


class Experiment:
  """A config's model, data, stages and evaluators on one prepared dataset."""

  def __init__(self, config: ml_collections.ConfigDict, data_dir: str, metadata: Mapping,
               workdir: str):
    self.config, self.workdir = config, workdir
    self.model_def = models.get(config.model.name)
    self.data = data_lib.Data(config, self.model_def.DATA, data_dir, metadata, workdir)
    self.module = self.model_def.build(config.model, self.data.sizes, mesh_lib.AXIS)
    if config.get("best") and config.best not in config.evals:
      raise ValueError(f"config.best={config.best!r} is not one of config.evals "
                       f"({sorted(config.evals)})")

  @property
  def data_dir(self) -> str:
    return self.data.data_dir

  @property
  def metadata(self) -> Mapping:
    return self.data.metadata

  def init_variables(self, rng, example: Mapping) -> dict:
    return self.model_def.init(self.module, rng, example, self.config, self.data.data_dir)

  def loss_fn(self, stage: Stage):
    return self.model_def.loss_fn(self.module, self.config, stage.loss)

  def stage_specs(self) -> list[dict]:
    """config.stages, or one stage of the whole run: [{"share", "loss", "frozen"}]."""
    return [dict(s) for s in self.config.get("stages") or ()] or [{"share": 1.0}]

  def stages(self, steps_per_epoch: int) -> list[Stage]:
    out, end = [], 0
    for s in self.stage_specs():
      end += int(round(s["share"] * self.config.num_epochs * steps_per_epoch))
      loss = ml_collections.ConfigDict(self.config.loss.to_dict())
      loss.update(dict(s.get("loss") or {}))
      out.append(Stage(end, loss, tuple(s.get("frozen") or ())))
    return out

  def term_weights(self) -> dict[str, float]:
    """DU2MCE: the largest weight of each loss term over the stages (a term
    with weight 0 in every stage was never trained)."""
    weights = {}
    for stage in self.stages(1):
      for term, w in losses.term_weights(stage.loss.l1, stage.loss.l2).items():
        weights[term] = max(weights.get(term, 0.0), w)
    return weights

  def evaluators(self, mesh: Mesh) -> dict:
    """{name: evaluator} of config.evals, each built once (its errors, e.g. a
    split without queries, stop the run before training)."""
    out = {}
    for name, block in self.config.evals.items():
      try:
        out[name] = evals.get(block.type).build(block, self, mesh)
      except (ValueError, FileNotFoundError) as e:
        raise type(e)(f"config.evals.{name}: {e}") from None
    return out
