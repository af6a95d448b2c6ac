"""The training loop never waits for the devices between log points: no
device-to-host read on a step that neither logs, checkpoints nor evaluates."""

import contextlib

import ml_collections
from jax._src import array as jax_array

from sempre_jax import models, train
from tests import test_registry


@contextlib.contextmanager
def counting_host_reads():
  """Counts every device-to-host conversion of a jax.Array (np.asarray, float,
  device_get all go through ArrayImpl._value)."""
  reads = [0]
  original = jax_array.ArrayImpl._value

  def counted(self):
    reads[0] += 1
    return original.fget(self)

  jax_array.ArrayImpl._value = property(counted)
  try:
    yield reads
  finally:
    jax_array.ArrayImpl._value = original


def _config(data_dir: str, steps: int) -> ml_collections.ConfigDict:
  """The toy model, `steps` steps (2 a epoch), logging and checkpointing only at the end."""
  return ml_collections.ConfigDict({
      "seed": 0, "num_devices": 2, "batch_size": 16, "num_epochs": steps // 2,
      "learning_rate": 0.1, "lr_decay": 1.0, "lr_decay_epochs": 1, "optimizer": "adam",
      "model": {"name": "toy", "embed_dim": 8, "image_input": "features"},
      "data": {"dir": data_dir}, "loss": {"weight": 1.0}, "stages": (),
      "log_every_steps": steps, "checkpoint_every_steps": steps, "keep_checkpoints": 1,
      "evals": {}, "best": ""})


def test_steps_between_log_points_make_no_host_read(tmp_path, toy_data):
  models.register("toy", test_registry.Toy())
  reads = {}
  for steps in (6, 24):
    with counting_host_reads() as count:
      state, _ = train.train_and_evaluate(_config(toy_data[0], steps),
                                          str(tmp_path / str(steps)), *toy_data)
    assert int(state.step) == steps
    reads[steps] = count[0]
  # 18 more steps, the same log and checkpoint points: not one more read.
  assert reads[24] == reads[6] > 0, reads

