"""How are arrays laid out over the devices of the job?

One 1-D ("data",) mesh over every device of every process. Training splits
the global batch over it, each process feeding its own part (`shard_batch`).
Evaluation and export work on values every process holds in full (parameters,
the records of a split) and place them on the mesh with `put_global`: rows
split over the devices, or replicated. Frozen tables the step reads by row
(image features or pixels by image id) are placed once with `put_table`:
replicated when small, so a gather is local; split by rows over the devices
when large, where a gather is a collective (`take_rows`).
"""

from collections.abc import Mapping

import jax
import jax.numpy as jnp
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


def put_table(mesh: Mesh, table: np.ndarray, max_replicated_bytes: int) -> tuple[jax.Array, P]:
  """A table every process holds (e.g. memory-mapped) [R, ...] -> (the table
  on the mesh, its spec): replicated (P()) up to `max_replicated_bytes`,
  else its rows split over the data axis (P(AXIS)), zero rows appended up to
  a multiple of the devices. Each device's rows are read from `table` once."""
  spec = P() if table.nbytes <= max_replicated_bytes else P(AXIS)
  rows = round_up(len(table), mesh.devices.size if spec == P(AXIS) else 1)

  def piece(index):
    start, stop, _ = index[0].indices(rows)
    out = np.zeros((stop - start,) + table.shape[1:], table.dtype)
    real = table[start:min(stop, len(table))]
    out[:len(real)] = real
    return out
  return jax.make_array_from_callback((rows,) + table.shape[1:], NamedSharding(mesh, spec),
                                      piece), spec


def take_rows(table: jax.Array, ids: jax.Array, spec: P) -> jax.Array:
  """Per device, inside shard_map: rows `ids` [b] of a table placed by
  put_table -> [b, ...], zeros where id < 0.

  P(): a local gather. P(AXIS) (device d holds rows d r .. (d+1) r - 1): the
  ids of the whole batch are all-gathered, each device fills the rows it
  holds (zeros elsewhere) and a reduce-scatter sums them back to the devices
  of the batch: [G, ...] moved per device per call.
  """
  def gather(local_ids, valid):
    rows = jnp.take(table, jnp.clip(local_ids, 0, table.shape[0] - 1), axis=0)
    return jnp.where(valid.reshape(valid.shape + (1,) * (rows.ndim - 1)), rows,
                     jnp.zeros((), rows.dtype))
  if spec == P():
    return gather(ids, ids >= 0)
  every = jax.lax.all_gather(ids, AXIS, tiled=True)
  local = every - jax.lax.axis_index(AXIS) * table.shape[0]
  rows = gather(local, (every >= 0) & (local >= 0) & (local < table.shape[0]))
  return jax.lax.psum_scatter(rows, AXIS, scatter_dimension=0, tiled=True)


def to_host(tree):
  """Replicated global arrays (or host arrays) -> NumPy (this process's copy)."""
  return jax.tree.map(lambda x: np.asarray(x.addressable_data(0) if isinstance(x, jax.Array)
                                           else x), tree)


def round_up(n: int, multiple: int) -> int:
  """The smallest multiple of `multiple` that is >= n (and >= multiple)."""
  return max(-(-n // multiple), 1) * multiple
