"""What does the training loop cost the host, against the bare step?

  python benchmarks/host_overhead.py [--log_every=100] [--logs=8] [--rounds=5]

A tiny DU2MCE (16-d towers) on a tiny embedded corpus, evaluators off, 1 device:
  loop  sempre_jax.train.train_and_evaluate, `logs` log intervals of
        `log_every` steps (a checkpoint at the end only); its rate is the
        median of the progress lines' steps/s after the first interval (which
        holds the compilation);
  bare  the same jitted step (the same Feed: image features gathered on the
        device) called in a plain Python loop on one pre-sharded batch, timed
        over chunks of `log_every` steps (median after the first).
Rounds alternate loop and bare; each round's ratio of medians is printed,
then the ratio of the fastest interval of each (other load on the machine
only slows a run down, so the fastest is the least disturbed). A first, counted loop run attributes every device-to-host read (at
jax.Array._value, as tests/test_loop.py counts them) to the step whose
dispatch it follows: the steps that neither log nor checkpoint must read
nothing. Prints a table and a JSON line.
"""

import collections
import contextlib
import io
import json
import statistics
import tempfile
import time

import jax
import ml_collections
from absl import app, flags
from jax._src import array as jax_array
from jax.sharding import NamedSharding, PartitionSpec as P

from configs import du2mce
from input_pipeline import embedded, records
from sempre_jax import mesh as mesh_lib, train
from sempre_jax.experiment import Experiment

flags.DEFINE_integer("log_every", 100, "Steps per log interval.")
flags.DEFINE_integer("logs", 8, "Log intervals per loop run.")
flags.DEFINE_integer("rounds", 5, "Loop/bare pairs timed.")
FLAGS = flags.FLAGS


def tiny_config(data_dir: str, steps: int) -> ml_collections.ConfigDict:
  config = du2mce.get_config()
  config.data.dir = data_dir
  config.model.update(embed_dim=16, word_dim=16, user_dim=16, text_filters=(16, 16, 16),
                      init_from_word2vec=False)
  config.update(batch_size=32, num_devices=1, log_every_steps=FLAGS.log_every,
                checkpoint_every_steps=10**9, best="")       # the last step only
  config.evals = ml_collections.ConfigDict()
  meta = records.read_metadata(data_dir)
  config.num_epochs = -(-steps // (meta["splits"]["train"]["num_posts"] // config.batch_size))
  return config


@contextlib.contextmanager
def recorded():
  """Yields (progress rates, {step: device-to-host reads after its dispatch})."""
  rates, reads, calls = [], collections.Counter(), [0]
  make_step, report, value = train.make_train_step, train.Progress.report, jax_array.ArrayImpl._value

  def counted_make(*args, **kwargs):
    step, zero_sums = make_step(*args, **kwargs)

    def counted(*a):
      calls[0] += 1
      return step(*a)
    return counted, zero_sums

  def reporting(self, step, sums):
    scalars, line = report(self, step, sums)
    rates.append((scalars["steps_per_s"], time.process_time()))
    return scalars, line

  def reading(self):
    reads[calls[0]] += 1
    return value.fget(self)

  train.make_train_step, train.Progress.report = counted_make, reporting
  jax_array.ArrayImpl._value = property(reading)
  try:
    yield rates, reads
  finally:
    train.make_train_step, train.Progress.report = make_step, report
    jax_array.ArrayImpl._value = value


def loop_run(config, data_dir: str) -> tuple[list[float], collections.Counter, int]:
  """(progress steps/s, reads per step, total steps) of one training run."""
  with tempfile.TemporaryDirectory() as workdir, recorded() as (rates, reads), \
      contextlib.redirect_stdout(io.StringIO()):
    state, _ = train.train_and_evaluate(config, workdir, data_dir,
                                        records.read_metadata(data_dir))
  return rates, reads, int(state.step)


def bare_rates(config, data_dir: str) -> list[float]:
  """Steps/s of the jitted step in a plain loop on one pre-sharded batch, over
  `logs` chunks of `log_every` steps (as the loop's log intervals)."""
  with tempfile.TemporaryDirectory() as workdir:
    exp = Experiment(config, data_dir, records.read_metadata(data_dir), workdir)
  mesh = mesh_lib.make_mesh(1)
  feed = exp.data.feed(mesh)
  rows = next(iter(exp.data.train_dataset(config.batch_size, 0, 1)))
  batch = mesh_lib.shard_batch(mesh, rows)
  example = exp.data.host_inputs({k: v[:1] for k, v in rows.items()})
  spe = exp.data.num_train // config.batch_size
  state = train.create_train_state(exp.init_variables(jax.random.key(0), example),
                                   train.make_optimizer(config, spe))
  state = jax.device_put(state, NamedSharding(mesh, P()))
  step, zero_sums = train.make_train_step(exp.loss_fn(exp.stages(spe)[0]), mesh,
                                          config.seed, feed)
  sums = zero_sums(state, batch)
  rates = []
  for _ in range(FLAGS.logs):
    t, cpu = time.perf_counter(), time.process_time()
    for _ in range(FLAGS.log_every):
      state, sums = step(state, sums, batch)
    jax.block_until_ready(sums)
    rates.append((FLAGS.log_every / (time.perf_counter() - t),
                  (time.process_time() - cpu) / FLAGS.log_every))
  return rates


def main(argv):
  del argv
  steps = FLAGS.log_every * FLAGS.logs
  with tempfile.TemporaryDirectory() as root:
    spec = dict(num_users=40, num_topics=8, posts_per_user=30, feature_dim=32, seed=0)
    data_dir = embedded.ensure(spec, {"test": 0.1}, num_shards=2, word2vec_dim=0, seed=0,
                               root=root, log=lambda *a: None)
    config = tiny_config(data_dir, steps)
    _, reads, total = loop_run(config, data_dir)
    logged = {s for s in range(1, total + 1)
              if s % config.log_every_steps == 0 or s == total}
    stray = {s: n for s, n in reads.items() if s and s not in logged}
    rounds = []
    for _ in range(FLAGS.rounds):      # full intervals after the first, both ways
      marks = loop_run(config, data_dir)[0][:FLAGS.logs]
      loop = [(rate, (b - a) / config.log_every_steps)
              for (_, a), (rate, b) in zip(marks, marks[1:])]
      rounds.append((loop, bare_rates(config, data_dir)[1:]))
  print(f"{total} steps of {config.batch_size} posts, a log every {config.log_every_steps}, "
        f"a checkpoint at the end; device-to-host reads: {reads[0]} before the first step, "
        f"{sum(n for s, n in reads.items() if s in logged)} on the {len(logged)} log/checkpoint "
        f"steps, {sum(stray.values())} on the {total - len(logged)} other steps")
  print(f"{'':>5} {'steps/s':>19} {'':>6} {'host CPU ms/step':>19}")
  print(f"{'round':>5} {'loop':>9} {'bare':>9} {'ratio':>6} {'loop':>9} {'bare':>9} {'ratio':>6}")
  med = lambda xs, i: statistics.median(x[i] for x in xs)
  rows = [(med(a, 0), med(b, 0), 1e3 * med(a, 1), 1e3 * med(b, 1)) for a, b in rounds]
  best = lambda k, i, pick: pick(x[i] for r in rounds for x in r[k])
  rows.append((best(0, 0, max), best(1, 0, max), 1e3 * best(0, 1, min), 1e3 * best(1, 1, min)))
  for name, (lr, br, lc, bc) in zip([*map(str, range(len(rounds))), "best"], rows):
    print(f"{name:>5} {lr:>9.1f} {br:>9.1f} {lr / br:>6.3f} {lc:>9.3f} {bc:>9.3f} {bc / lc:>6.3f}")
  print("(medians of the intervals of each round; best: the fastest interval, the least "
        "host CPU per step: other load on the machine only slows a run down)")
  print(json.dumps({"steps": total, "reads_before_first_step": reads[0],
                    "reads_on_other_steps": sum(stray.values()),
                    "steps_per_s_ratios": [round(r[0] / r[1], 3) for r in rows],
                    "cpu_per_step_ratios": [round(r[3] / r[2], 3) for r in rows]}))


if __name__ == "__main__":
  app.run(main)
