"""Input-pipeline throughput alone: posts/s per process from shards to
device-ready sharded batches, against what a paper-size step needs.

  python benchmarks/pipeline.py [--posts=131072] [--batch_sizes=1000,4096] [--seconds=5]

Writes a train split with the paper's record contents (20 tokens a post, half
the posts with an image; their 2048-d float32 features go to the image table,
not the records) in blocks of records.BLOCK_POSTS, places the feature table on
this process's devices once (timed), then for each batch size times
  iterator  loader.train_dataset's batches on the host (read, CRC, shuffle);
  to device the training loop's feed, train.DeviceBatches, its batches placed
            on the mesh as the train step's call places them (a jit's
            in_shardings), each made ready (block_until_ready) before the
            next is taken.
A paper-size DU2MCE step costs 0.141 GFLOP a post (forward + backward), so an
H100 at 40% of its ~1 PFLOP/s bf16 peak consumes 400e12 / 0.141e9 = 2.8M
posts/s; that rate is printed beside each measurement. Prints a table and a
JSON line.
"""

import json
import os
import tempfile
import time

import jax
import numpy as np
from absl import app, flags
from jax.sharding import NamedSharding, PartitionSpec as P

from input_pipeline import loader, records
from sempre_jax import data, mesh as mesh_lib, train

flags.DEFINE_integer("posts", 131_072, "Train posts written.")
flags.DEFINE_list("batch_sizes", ["1000", "4096"], "Per-process batch sizes to time.")
flags.DEFINE_float("seconds", 5.0, "Seconds per measurement.")
flags.DEFINE_integer("feature_dim", 2048, "Image feature size (the table's row).")
flags.DEFINE_integer("block_posts", records.BLOCK_POSTS, "Posts per record.")
FLAGS = flags.FLAGS

GFLOP_PER_POST = 0.141
H100_FLOPS = 1e15 * 0.4


def write_split(directory: str, n: int, feature_dim: int, block_posts: int,
                seed: int = 0) -> dict:
  """A paper-like train split and its feature table; returns the metadata."""
  rng = np.random.default_rng(seed)
  has_image = rng.random(n) < 0.5
  num_images = int(has_image.sum())
  image_id = np.full(n, -1)
  image_id[has_image] = rng.permutation(num_images)
  rows = records.post_rows(rng.integers(0, 40_000, n), image_id,
                           1_400_000_000 + np.arange(n), rng.integers(2, 20_000, [n, 20]))
  split = records.write_split(directory, "train", [(rows, [f"p{i}" for i in range(n)])], 4,
                              block_posts)
  table = records.new_table(directory, "image_features", (num_images, feature_dim), np.float32)
  table[:] = rng.standard_normal(table.shape, np.float32)
  table.flush()
  meta = {"num_users": 40_000, "vocab_size": 20_000, "feature_dim": feature_dim,
          "image_size": 0, "num_images": num_images, "splits": {"train": split}}
  records.write_metadata(directory, meta)
  return records.read_metadata(directory)


def rate(batches, batch_size: int, seconds: float, ready=lambda b: b) -> float:
  """Posts/s of an iterator over `seconds` (after one warm-up batch)."""
  ready(next(batches))
  posts, t = 0, time.perf_counter()
  while time.perf_counter() - t < seconds:
    ready(next(batches))
    posts += batch_size
  return posts / (time.perf_counter() - t)


def main(argv):
  del argv
  needed = H100_FLOPS / (GFLOP_PER_POST * 1e9)
  mesh = mesh_lib.make_mesh(local=True)
  with tempfile.TemporaryDirectory() as d:
    t = time.perf_counter()
    meta = write_split(d, FLAGS.posts, FLAGS.feature_dim, FLAGS.block_posts)
    written = time.perf_counter() - t
    t = time.perf_counter()
    table = records.read_table(d, meta, "image_features")
    placed, spec = mesh_lib.put_table(mesh, table, data.REPLICATED_TABLE_MIB << 20)
    jax.block_until_ready(placed)
    placing = time.perf_counter() - t
    shard_bytes = os.path.getsize(os.path.join(d, meta["splits"]["train"]["shards"][0]))
    out = []
    for b in map(int, FLAGS.batch_sizes):
      dataset = loader.train_dataset(d, meta, batch_size=b, seed=0)
      host = rate(iter(dataset), b, FLAGS.seconds)
      fed = train.DeviceBatches(dataset, mesh)
      sharding = NamedSharding(mesh, P(mesh_lib.AXIS))
      place = jax.jit(lambda batch: batch, in_shardings=sharding, out_shardings=sharding)
      device = rate(map(place, fed), b, FLAGS.seconds, jax.block_until_ready)
      fed.close()
      out.append({"batch_size": b, "iterator_posts_per_s": round(host),
                  "to_device_posts_per_s": round(device)})
  print(f"{FLAGS.posts} train posts in blocks of {FLAGS.block_posts} "
        f"({records.POST.itemsize} bytes a post in the records, {4 * shard_bytes / FLAGS.posts:.0f} "
        f"with framing and ids; written in {written:.1f}s); feature table "
        f"{list(table.shape)} float32 ({table.nbytes / 2**20:.0f} MiB) placed on "
        f"{mesh.devices.size} {jax.default_backend()} device(s) as {spec} in {placing:.2f}s")
  print(f"{'batch':>6} {'iterator posts/s':>17} {'to device posts/s':>18} "
        f"{'H100 step needs':>16} {'ratio':>6}")
  for r in out:
    print(f"{r['batch_size']:>6} {r['iterator_posts_per_s']:>17,} "
          f"{r['to_device_posts_per_s']:>18,} {needed:>16,.0f} "
          f"{r['to_device_posts_per_s'] / needed:>6.2f}")
  print(json.dumps({"posts": FLAGS.posts, "h100_posts_per_s_needed": round(needed),
                    "cpu_cores": os.cpu_count(), "results": out}))


if __name__ == "__main__":
  app.run(main)
