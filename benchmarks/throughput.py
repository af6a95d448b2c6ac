"""Train-step and input-pipeline throughput, with model FLOPs utilisation, and
the same step in PyTorch.

  python benchmarks/throughput.py [--modes=features,pixels]
      [--dtypes=float32,bfloat16] [--steps=10] [--peer=torch]
      [--batch_size=1000] [--round_steps=1]

For each mode (DU2MCE on frozen image features, or on pixels through the small
CNN) and compute dtype at the paper's sizes (batch 1000, D = 1024, 40k users,
20k words; --batch_size changes the global batch):
  - the train step's posts/s on all local devices, its model FLOPs per second
    and their ratio to the matmul peak of that dtype measured in the same run
    (MFU; bfloat16: bfloat16 operands summed in float32);
  - the input pipeline's posts/s from shards to device-ready batches, alone and
    while the train step runs in the main thread.
With --peer=torch (pip install -e ".[torch]"), the features step of sempre-jax in
float32 and bfloat16 and of its plain PyTorch peer (benchmarks/torch_peer.py:
eager float32, torch.compile float32, eager bfloat16 autocast) on the same
batch from the same parameters: the loss of each on that batch (their
difference to sempre-jax float32 shows they compute the same thing), then
their steps interleaved round by round (each round `round_steps` steps after a
pause, so no one's spinning threads eat into the next), posts/s per
implementation and the per-round ratios sempre-jax / peer (median and range).
Steps are dispatched back to back and the loss of the last one read, so a
timing holds no host round trip per step.
Prints tables and JSON lines. Runs unchanged on CPU, GPU or TPU (the peer on the
GPU where JAX runs on one and torch sees CUDA, else on the CPU).
"""

import inspect
import json
import tempfile
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from jax.sharding import NamedSharding, PartitionSpec as P

from configs import du2mce as du2mce_config
from input_pipeline import embedded, loader, records
from sempre_jax import losses, mesh as mesh_lib, train
from sempre_jax.models import du2mce

flags.DEFINE_list("modes", ["features", "pixels"], "Image inputs to benchmark.")
flags.DEFINE_list("dtypes", ["float32", "bfloat16"], "Compute dtypes (model.dtype).")
flags.DEFINE_integer("steps", 10, "Timed train steps per mode and dtype (rounds with --peer).")
flags.DEFINE_integer("users", 40_000, "Users (rows of the user table).")
flags.DEFINE_integer("vocab", 20_000, "Words (rows of the word table).")
flags.DEFINE_integer("image_size", 64, "Pixel side for the pixels mode.")
flags.DEFINE_enum("peer", "", ["", "torch"], "Also time this framework's version of the step.")
flags.DEFINE_integer("batch_size", 1000, "Global batch (the paper's: 1000).")
flags.DEFINE_integer("round_steps", 1, "Steps per timed round of the peer comparison.")
flags.DEFINE_integer("peak_size", 0, "Side of the peak matmul (0: 4096 on a CPU, else 8192).")
FLAGS = flags.FLAGS


def matmul_peak(dtype: str, n: int, reps: int = 10) -> float:
  """Best FLOP/s of a jitted n x n matmul (of 3 timings), random operands in
  `dtype`, products summed in float32."""
  a = jax.random.normal(jax.random.key(0), (n, n), dtype)
  f = jax.jit(lambda x: jnp.matmul(x, x, preferred_element_type=jnp.float32))
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


class JaxStep:
  """sempre-jax's DU2MCE train step on one batch (`run` advances the state)."""

  def __init__(self, config, batch: dict, mesh):
    module = du2mce.build(config.model, {"num_users": FLAGS.users, "vocab_size": FLAGS.vocab})
    state = train.create_train_state(module.init(jax.random.key(0), batch),
                                     train.make_optimizer(config, 100))
    self.params = jax.device_get(state.params)      # the initial parameters, on the host
    self.step, zero_sums = train.make_train_step(du2mce.loss_fn(module, config, config.loss), mesh)
    self.state = jax.device_put(state, NamedSharding(mesh, P()))
    self.batch = mesh_lib.shard_batch(mesh, batch)
    self.zero = zero_sums(self.state, self.batch)

  def run(self) -> jax.Array:
    """Dispatches one step; returns the loss before its update (not yet read)."""
    self.state, sums = self.step(self.state, self.zero, self.batch)
    return sums["loss"]


def time_steps(run, steps: int) -> float:
  """Seconds per call of run(), `steps` calls back to back and the last loss
  read (after one untimed call)."""
  float(run())
  t = time.perf_counter()
  for _ in range(steps):
    loss = run()
  float(loss)
  return (time.perf_counter() - t) / steps


def pipeline_rate(data_iter, seconds: float, stop: threading.Event | None = None):
  """Posts/s from shards to batches on the devices (the training loop's feed,
  image inputs gathered in the step), for `seconds` or until `stop`."""
  posts, t = 0, time.perf_counter()
  while time.perf_counter() - t < seconds and not (stop and stop.is_set()):
    batch = jax.block_until_ready(next(data_iter))
    posts += batch["posts"].shape[0]
  return posts / (time.perf_counter() - t)


def bench_mode(image_input: str, dtypes, data_dir: str, metadata: dict, peaks: dict) -> list:
  """One row per dtype: step throughput and MFU; the pipeline alone and while
  the first dtype's step runs."""
  config = du2mce_config.get_config()
  config.model.image_input = image_input
  bs, mesh = FLAGS.batch_size, mesh_lib.make_mesh()
  batch = random_batch(bs, FLAGS.users, FLAGS.vocab, image_input, FLAGS.image_size,
                       np.random.default_rng(0))
  flops = model_flops_per_post(config, bs, FLAGS.image_size)
  rows, runners = [], []
  for dtype in dtypes:
    config.model.dtype = dtype
    runners.append(JaxStep(config, batch, mesh))
    step_s = time_steps(runners[-1].run, FLAGS.steps)
    rows.append({"mode": image_input, "dtype": dtype, "batch": bs,
                 "devices": mesh.devices.size, "step_ms": 1e3 * step_s,
                 "train_posts_per_s": bs / step_s, "model_gflop_per_post": flops / 1e9,
                 "model_gflop_per_s": flops * bs / step_s / 1e9,
                 "matmul_peak_gflop_per_s": peaks[dtype] / 1e9,
                 "mfu": flops * bs / step_s / peaks[dtype]})

  sharding = NamedSharding(mesh, P(mesh_lib.AXIS))     # placed as the step's call does
  place = jax.jit(lambda batch: batch, in_shardings=sharding, out_shardings=sharding)
  data_iter = map(place, train.DeviceBatches(
      loader.train_dataset(data_dir, metadata, batch_size=bs, seed=0), mesh))
  pipeline_rate(data_iter, 2.0)                       # warm up
  alone = pipeline_rate(data_iter, max(5.0, 3 * rows[0]["step_ms"] / 1e3))
  stop, rates = threading.Event(), []
  worker = threading.Thread(target=lambda: rates.append(
      pipeline_rate(data_iter, 1e9, stop)))
  worker.start()
  shared_step_s = time_steps(runners[0].run, FLAGS.steps)
  stop.set()
  worker.join()
  for r in rows:
    r.update(pipeline_posts_per_s=alone, pipeline_posts_per_s_while_training=rates[0],
             train_posts_per_s_while_pipeline=bs / shared_step_s,
             pipeline_over_train=alone * r["step_ms"] / 1e3 / bs)
  return rows


def loss_directions(config) -> str:
  """The hinge directions sempre-jax's loss computes under `config` ("both"
  where losses.du2mce_loss has no `directions` argument)."""
  arg = inspect.signature(losses.du2mce_loss).parameters.get("directions")
  return config.loss.get("directions", arg.default if arg else "both")


def compare_torch(steps: int) -> list:
  """sempre-jax float32 and bfloat16 vs the PyTorch peer, features step,
  interleaved rounds on one batch from the same parameters."""
  import torch                                      # pylint: disable=import-outside-toplevel
  import torch_peer                                 # pylint: disable=import-outside-toplevel

  config = du2mce_config.get_config()
  bs, mesh = FLAGS.batch_size, mesh_lib.make_mesh()
  batch = random_batch(bs, FLAGS.users, FLAGS.vocab, "features", 0, np.random.default_rng(0))
  device = "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"
  tbatch = torch_peer.to_torch(batch, device)
  directions = loss_directions(config)
  runs = {}
  for dtype in ("float32", "bfloat16"):
    config.model.dtype = dtype
    jax_step = JaxStep(config, batch, mesh)
    runs[f"sempre-jax {dtype}"] = jax_step.run
  params = jax_step.params                          # the same for both dtypes
  peers = {"torch eager float32": {}, "torch.compile float32": {"compile": True},
           "torch eager bfloat16 autocast": {"bfloat16": True}}
  for name, kwargs in peers.items():
    model = torch_peer.DU2MCE(FLAGS.users, FLAGS.vocab, config.model.embed_dim,
                              config.model.word_dim, config.model.user_dim,
                              config.model.text_widths, config.model.text_filters).to(device)
    trainer = torch_peer.Trainer(
        model.load_flax(params), learning_rate=config.learning_rate,
        lambdas=(config.loss.l1, config.loss.l2), margin=config.loss.margin,
        directions=directions, **kwargs)
    runs[name] = lambda trainer=trainer: trainer.step(tbatch)

  where = torch.cuda.get_device_name() if device == "cuda" else f"{torch.get_num_threads()} threads"
  print(f"\nPyTorch {torch.__version__} peer, {where}; loss "
        f"directions {directions!r}; loss on one batch from the same parameters:", flush=True)
  first = {}
  for name, run in runs.items():
    first[name] = float(run())                       # compiles; the loss before any update
    float(run())                                     # torch.compile may compile again
    print(f"  {name:<31} {first[name]:.6f}  (- sempre-jax float32: "
          f"{first[name] - first['sempre-jax float32']:+.2e})", flush=True)
  seconds = {name: [] for name in runs}
  for _ in range(steps):
    for name, run in runs.items():
      time.sleep(0.3)
      t = time.perf_counter()
      for _ in range(FLAGS.round_steps):
        loss = run()
      float(loss)
      seconds[name].append((time.perf_counter() - t) / FLAGS.round_steps)
  rows = [{"impl": name, "loss": first[name], "step_ms": 1e3 * np.median(s),
           "step_ms_min": 1e3 * min(s), "step_ms_max": 1e3 * max(s),
           "posts_per_s": bs / np.median(s)} for name, s in seconds.items()]
  print(f"{'implementation (features step)':<31} {'step ms (median, min-max)':>26} {'posts/s':>8}")
  for r in rows:
    print(f"{r['impl']:<31} {r['step_ms']:>10.0f} ({r['step_ms_min']:>5.0f}-"
          f"{r['step_ms_max']:>5.0f}) {r['posts_per_s']:>8.0f}")
  print(f"per-round speed ratio, sempre-jax / peer: median (min-max) over {steps} rounds")
  for ours in ("sempre-jax float32", "sempre-jax bfloat16"):
    for peer in peers:
      ratio = np.array(seconds[peer]) / np.array(seconds[ours])
      print(f"  {ours:<20} / {peer:<30} {np.median(ratio):.2f} "
            f"({ratio.min():.2f}-{ratio.max():.2f})")
      rows.append({"ratio": f"{ours} / {peer}", "median": float(np.median(ratio)),
                   "min": float(ratio.min()), "max": float(ratio.max())})
  return rows


def main(argv):
  del argv
  print(f"devices: {jax.device_count()} x {jax.devices()[0].device_kind}", flush=True)
  peak_n = FLAGS.peak_size or (4096 if jax.default_backend() == "cpu" else 8192)
  peaks = {dtype: matmul_peak(dtype, peak_n) for dtype in FLAGS.dtypes}
  results = []
  with tempfile.TemporaryDirectory() as tmp:
    for mode in FLAGS.modes:
      spec = dict(num_users=500, posts_per_user=max(12, -(-3 * FLAGS.batch_size // 500)),
                  image_fraction=0.5,
                  image_size=FLAGS.image_size if mode == "pixels" else 0)
      data_dir = embedded.ensure(spec, {"test": 0.01}, num_shards=4, word2vec_dim=0, seed=0,
                                 root=f"{tmp}/{mode}")
      metadata = records.read_metadata(data_dir)
      for r in bench_mode(mode, FLAGS.dtypes, data_dir, metadata, peaks):
        results.append(r)
        print(json.dumps(r), flush=True)
  print(f"\nmatmul peak ({peak_n}^2, jit): " + ", ".join(
      f"{d} {p / 1e9:.0f} GFLOP/s" for d, p in peaks.items())
        + f"; {FLAGS.users} users, {FLAGS.vocab} words, batch {FLAGS.batch_size}, D 1024")
  print(f"{'mode':<9} {'dtype':<9} {'step ms':>8} {'posts/s':>8} {'GFLOP/post':>10} "
        f"{'GFLOP/s':>8} {'MFU':>5} | {'pipeline posts/s':>16} {'x train':>7} "
        f"{'while training':>14}")
  for r in results:
    print(f"{r['mode']:<9} {r['dtype']:<9} {r['step_ms']:>8.0f} {r['train_posts_per_s']:>8.0f} "
          f"{r['model_gflop_per_post']:>10.3f} {r['model_gflop_per_s']:>8.1f} "
          f"{r['mfu']:>5.0%} | {r['pipeline_posts_per_s']:>16.0f} "
          f"{r['pipeline_over_train']:>7.1f} {r['pipeline_posts_per_s_while_training']:>14.0f}")
  if FLAGS.peer == "torch":
    for r in compare_torch(FLAGS.steps):
      print(json.dumps(r))


if __name__ == "__main__":
  app.run(main)
