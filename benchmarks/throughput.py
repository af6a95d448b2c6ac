"""Train-step and input-pipeline throughput, with model FLOPs utilisation.

  python benchmarks/throughput.py [--modes=features,pixels] [--steps=10]

For each mode (DU2MCE on frozen image features, or on pixels through the small
CNN) at the paper's sizes (batch 1000, D = 1024, 40k users, 20k words):
  - the train step's posts/s on all local devices, its model FLOPs per second
    and their ratio to the f32 matmul peak measured in the same run (MFU);
  - the input pipeline's posts/s from shards to device-ready batches, alone and
    while the train step runs in the main thread.
Prints a table and a JSON line. Runs unchanged on CPU, GPU or TPU.
"""

import json
import tempfile
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from jax.sharding import NamedSharding, PartitionSpec as P

from configs import du2mce
from input_pipeline import embedded, loader, records
from sempre_jax import losses, mesh as mesh_lib, tasks, train
from sempre_jax.models import du2mce

flags.DEFINE_list("modes", ["features", "pixels"], "Image inputs to benchmark.")
flags.DEFINE_integer("steps", 10, "Timed train steps per mode.")
flags.DEFINE_integer("users", 40_000, "Users (rows of the user table).")
flags.DEFINE_integer("vocab", 20_000, "Words (rows of the word table).")
flags.DEFINE_integer("image_size", 64, "Pixel side for the pixels mode.")
FLAGS = flags.FLAGS


def matmul_peak(n: int = 4096, reps: int = 10) -> float:
  """Best f32 FLOP/s of a jitted n x n matmul (of 3 timings)."""
  a = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  best = 0.0
  for _ in range(3):
    t = time.perf_counter()
    for _ in range(reps):
      out = f(a)
    out.block_until_ready()
    best = max(best, 2 * n**3 * reps / (time.perf_counter() - t))
  return best


def model_flops_per_post(config, batch_size: int, image_size: int) -> float:
  """Forward + backward (3x forward) FLOPs of one post, counted from the model.

  Text: Kim CNN over 20 positions plus its projection; image: projection of the
  features, or the 3x3 conv stack at image_size plus its projection; user: the
  projection (the table lookup is free); loss: one [G, G] similarity matrix per
  term, i.e. 2 G D per post and term.
  """
  m, L, D = config.model, records.MAX_LEN, config.model.embed_dim
  text = 2 * L * m.word_dim * sum(w * n for w, n in zip(m.text_widths, m.text_filters))
  text += 2 * sum(m.text_filters) * D
  if m.image_input == "features":
    image = 2 * 2048 * D
  else:
    channels, side, c_in, image = (32, 64, 128), image_size, 3, 0
    for i, c in enumerate(channels):
      image += 2 * side * side * 9 * c_in * c
      c_in, side = c, side // 2 if i < len(channels) - 1 else side
    image += 2 * c_in * D
  user = 2 * m.user_dim * D
  loss = len(losses.TERMS) * 2 * batch_size * D
  return 3 * (text + image + user + loss)


def random_batch(batch_size: int, users: int, vocab: int, image_input: str,
                 image_size: int, rng) -> dict:
  """A batch with the shapes and missing-modality mix of real data."""
  lengths = rng.integers(5, records.MAX_LEN + 1, [batch_size, 1])
  mask = np.arange(records.MAX_LEN)[None] < lengths
  has_image = rng.random(batch_size) < 0.5
  batch = {
      "user": rng.integers(0, users, batch_size).astype(np.int32),
      "tokens": np.where(mask, rng.integers(2, vocab, mask.shape), 0).astype(np.int32),
      "text_mask": mask, "image_mask": has_image,
      "text_hash": rng.integers(1, 2**31 - 1, batch_size).astype(np.int32),
      "image_id": np.where(has_image, np.arange(batch_size), -1).astype(np.int32)}
  if image_input == "features":
    batch["image_features"] = rng.normal(size=[batch_size, 2048]).astype(np.float32)
  else:
    batch["image"] = rng.integers(0, 255, [batch_size, image_size, image_size, 3],
                                  dtype=np.uint8)
  return batch


def time_steps(step, state, batch, steps: int) -> tuple[float, object]:
  state, metrics = step(state, batch)
  jax.block_until_ready(metrics)
  t = time.perf_counter()
  for _ in range(steps):
    state, metrics = step(state, batch)
  jax.block_until_ready(metrics)
  return (time.perf_counter() - t) / steps, state


def pipeline_rate(data_iter, mesh, seconds: float, stop: threading.Event | None = None):
  """Posts/s from shards to sharded device arrays, for `seconds` or until `stop`."""
  posts, t = 0, time.perf_counter()
  while time.perf_counter() - t < seconds and not (stop and stop.is_set()):
    batch = mesh_lib.shard_batch(mesh, next(data_iter))
    jax.block_until_ready(batch)
    posts += len(batch["user"])
  return posts / (time.perf_counter() - t)


def bench_mode(image_input: str, data_dir: str, metadata: dict) -> dict:
  config = du2mce.get_config()
  config.model.image_input = image_input
  bs = config.batch_size
  mesh = mesh_lib.make_mesh()
  model = du2mce.build_model(config.model, {"num_users": FLAGS.users,
                                            "vocab_size": FLAGS.vocab})
  batch = random_batch(bs, FLAGS.users, FLAGS.vocab, image_input, FLAGS.image_size,
                       np.random.default_rng(0))
  state = train.create_train_state(model.init(jax.random.key(0), batch),
                                   train.make_optimizer(config, 100))
  state = jax.device_put(state, NamedSharding(mesh, P()))
  step = train.make_train_step(
      tasks.du2mce_loss_fn(model, config.loss, (config.loss.l1, config.loss.l2)), mesh)
  device_batch = mesh_lib.shard_batch(mesh, batch)
  step_s, state = time_steps(step, state, device_batch, FLAGS.steps)

  data_iter = loader.train_iterator(
      data_dir, metadata, batch_size=bs, image_input=image_input,
      image_key=encoders.image_key(image_input), seed=0)
  pipeline_rate(data_iter, mesh, 2.0)                       # warm up the prefetch
  alone = pipeline_rate(data_iter, mesh, max(5.0, 3 * step_s))
  stop, rates = threading.Event(), []
  worker = threading.Thread(target=lambda: rates.append(
      pipeline_rate(data_iter, mesh, 1e9, stop)))
  worker.start()
  shared_step_s, state = time_steps(step, state, device_batch, FLAGS.steps)
  stop.set()
  worker.join()

  flops = model_flops_per_post(config, bs, FLAGS.image_size)
  return {"mode": image_input, "batch": bs, "devices": mesh.devices.size,
          "step_ms": 1e3 * step_s, "train_posts_per_s": bs / step_s,
          "model_gflop_per_post": flops / 1e9,
          "model_gflop_per_s": flops * bs / step_s / 1e9,
          "pipeline_posts_per_s": alone, "pipeline_posts_per_s_while_training": rates[0],
          "train_posts_per_s_while_pipeline": bs / shared_step_s,
          "pipeline_over_train": alone / (bs / step_s)}


def main(argv):
  del argv
  print(f"devices: {jax.device_count()} x {jax.devices()[0].device_kind}", flush=True)
  peak = matmul_peak()
  results = []
  with tempfile.TemporaryDirectory() as tmp:
    for mode in FLAGS.modes:
      spec = dict(num_users=500, posts_per_user=12, image_fraction=0.5,
                  image_size=FLAGS.image_size if mode == "pixels" else 0)
      data_dir = embedded.ensure(spec, {"test": 0.01}, num_shards=4, word2vec_dim=0, seed=0,
                                 root=f"{tmp}/{mode}")
      metadata = records.read_metadata(data_dir)
      r = bench_mode(mode, data_dir, metadata)
      r["matmul_peak_gflop_per_s"] = peak / 1e9
      r["mfu"] = r["model_gflop_per_s"] * 1e9 / peak
      results.append(r)
      print(json.dumps(r), flush=True)
  print(f"\nf32 matmul peak (4096^2, jit): {peak / 1e9:.0f} GFLOP/s; "
        f"{FLAGS.users} users, {FLAGS.vocab} words, batch 1000, D 1024")
  print(f"{'mode':<9} {'step ms':>8} {'posts/s':>8} {'GFLOP/post':>10} {'GFLOP/s':>8} "
        f"{'MFU':>5} | {'pipeline posts/s':>16} {'x train':>7} {'while training':>14}")
  for r in results:
    print(f"{r['mode']:<9} {r['step_ms']:>8.0f} {r['train_posts_per_s']:>8.0f} "
          f"{r['model_gflop_per_post']:>10.3f} {r['model_gflop_per_s']:>8.1f} "
          f"{r['mfu']:>5.0%} | {r['pipeline_posts_per_s']:>16.0f} "
          f"{r['pipeline_over_train']:>7.1f} {r['pipeline_posts_per_s_while_training']:>14.0f}")


if __name__ == "__main__":
  app.run(main)
