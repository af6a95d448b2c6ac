"""How are arrays laid out over the devices of the job?

One 1-D ("data",) mesh over every device of every process. Training splits
the global batch over it, each process feeding its own part (`shard_batch`).
Evaluation and export work on values every process holds in full (parameters,
the records of a split) and place them on the mesh with `put_global`: rows
split over the devices, or replicated.
"""

from collections.abc import Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXIS = "data"


def make_mesh(num_devices: int | None = None, local: bool = False) -> Mesh:
  """A 1-D ("data",) mesh over the first `num_devices` devices (all by default)
  of the job, or of this process only (`local`)."""
  devices = jax.local_devices() if local else jax.devices()
  if num_devices:
    devices = devices[:num_devices]
  return Mesh(np.array(devices), (AXIS,))


def shard_batch(mesh: Mesh, local_batch: Mapping[str, np.ndarray]) -> dict:
  """This process's part of the batch -> global arrays split over the data axis."""
  sharding = NamedSharding(mesh, P(AXIS))
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, x), dict(local_batch))


def put_global(mesh: Mesh, tree, spec: P = P()):
  """A value every process holds in full -> global arrays laid out by `spec`.

  P() replicates; P(AXIS) splits the leading axis over the devices (its size
  must be divisible by the number of devices). Each process places only the
  pieces its own devices hold.
  """
  def put(x):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, NamedSharding(mesh, spec),
                                        lambda index: x[index])
  return jax.tree.map(put, tree)


def to_host(tree):
  """Replicated global arrays (or host arrays) -> NumPy (this process's copy)."""
  return jax.tree.map(lambda x: np.asarray(x.addressable_data(0) if isinstance(x, jax.Array)
                                           else x), tree)


def round_up(n: int, multiple: int) -> int:
  """The smallest multiple of `multiple` that is >= n (and >= multiple)."""
  return max(-(-n // multiple), 1) * multiple
