"""What does the training loop cost the host, against the bare step?

  python benchmarks/host_overhead.py [--log_every=100] [--logs=8] [--rounds=5]

A tiny DU2MCE (16-d towers) on a tiny embedded corpus, evaluators off, 1 device:
  loop  sempre_jax.train.train_and_evaluate, `logs` log intervals of
        `log_every` steps (a checkpoint at the end only);
  bare  the same jitted step (the same Feed: image features gathered on the
        device) called in a plain Python loop on one pre-sharded batch.
The two are interleaved tightly: at each log point of the loop (inside its
progress report, after the loop has read its metrics) the bare loop runs
`log_every` steps in the same process on a state of its own, so each loop
interval has a bare interval timed beside it, under the same load of the
machine (this CPU's speed drifts by 2x over seconds; runs timed one after the
other mostly measure that drift). `rounds` loop runs; every full interval
after the first of a run (which holds the compilation) gives a pair. Prints
the per-pair ratio loop/bare of steps/s and of host CPU time per step (all
threads of the process), their median and quartiles, and the ratio of the
fastest interval of each (other load only slows a run down).

A first loop run, with no bare intervals, attributes every device-to-host read
(at jax.Array._value, as tests/test_loop.py counts them) to the step whose
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


class Bare:
  """The jitted step of `config` in a plain Python loop on one pre-sharded
  batch, on a state of its own; chunk() times `log_every` steps."""

  def __init__(self, config, data_dir: str):
    with tempfile.TemporaryDirectory() as workdir:
      exp = Experiment(config, data_dir, records.read_metadata(data_dir), workdir)
    mesh = mesh_lib.make_mesh(1)
    feed = exp.data.feed(mesh)
    rows = next(iter(exp.data.train_dataset(config.batch_size, 0, 1)))
    self.batch = mesh_lib.shard_batch(mesh, rows)
    example = exp.data.host_inputs({k: v[:1] for k, v in rows.items()})
    spe = exp.data.num_train // config.batch_size
    state = train.create_train_state(exp.init_variables(jax.random.key(0), example),
                                     train.make_optimizer(config, spe))
    self.state = jax.device_put(state, NamedSharding(mesh, P()))
    self.step, zero_sums = train.make_train_step(exp.loss_fn(exp.stages(spe)[0]), mesh,
                                                 config.seed, feed)
    self.sums = zero_sums(self.state, self.batch)
    self.steps = config.log_every_steps
    self.chunk()                                            # compiles

  def chunk(self) -> tuple[float, float]:
    """(steps/s, host CPU seconds a step) of `log_every` steps."""
    t, cpu = time.perf_counter(), time.process_time()
    for _ in range(self.steps):
      self.state, self.sums = self.step(self.state, self.sums, self.batch)
    jax.block_until_ready(self.sums)
    return self.steps / (time.perf_counter() - t), (time.process_time() - cpu) / self.steps


@contextlib.contextmanager
def recorded(bare: Bare | None):
  """Yields (pairs, reads): pairs [(loop steps/s, loop CPU s/step, bare
  steps/s, bare CPU s/step)], one per full log interval after the first, the
  bare interval timed at its end (none without `bare`); reads {step:
  device-to-host reads after its dispatch}."""
  pairs, reads, calls, marks = [], collections.Counter(), [0], []
  make_step, report, value = train.make_train_step, train.Progress.report, jax_array.ArrayImpl._value

  def counted_make(*args, **kwargs):
    step, zero_sums = make_step(*args, **kwargs)

    def counted(*a):
      calls[0] += 1
      return step(*a)
    return counted, zero_sums

  def reporting(self, step, sums):
    out = report(self, step, sums)
    now, cpu = time.perf_counter(), time.process_time()
    if bare is not None:
      if marks and step - marks[-1][0] == bare.steps:
        n = step - marks[-1][0]
        pairs.append((n / (now - marks[-1][1]), (cpu - marks[-1][2]) / n, *bare.chunk()))
      marks.append((step, time.perf_counter(), time.process_time()))
    return out

  def reading(self):
    reads[calls[0]] += 1
    return value.fget(self)

  train.make_train_step, train.Progress.report = counted_make, reporting
  jax_array.ArrayImpl._value = property(reading)
  try:
    yield pairs, reads
  finally:
    train.make_train_step, train.Progress.report = make_step, report
    jax_array.ArrayImpl._value = value


def loop_run(config, data_dir: str, bare: Bare | None = None):
  """(pairs, reads per step, total steps) of one training run (see recorded)."""
  with tempfile.TemporaryDirectory() as workdir, recorded(bare) as (pairs, reads), \
      contextlib.redirect_stdout(io.StringIO()):
    state, _ = train.train_and_evaluate(config, workdir, data_dir,
                                        records.read_metadata(data_dir))
  return pairs, reads, int(state.step)


def quartiles(xs) -> tuple[float, float, float]:
  q = statistics.quantiles(xs, n=4, method="inclusive")
  return q[0], q[1], q[2]


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
    bare = Bare(config, data_dir)
    pairs = [p for _ in range(FLAGS.rounds) for p in loop_run(config, data_dir, bare)[0]]
  print(f"{total} steps of {config.batch_size} posts, a log every {config.log_every_steps}, "
        f"a checkpoint at the end; device-to-host reads: {reads[0]} before the first step, "
        f"{sum(n for s, n in reads.items() if s in logged)} on the {len(logged)} log/checkpoint "
        f"steps, {sum(stray.values())} on the {total - len(logged)} other steps")
  rate = [p[0] / p[2] for p in pairs]
  cpu = [p[3] / p[1] for p in pairs]
  best = (max(p[0] for p in pairs) / max(p[2] for p in pairs),
          min(p[3] for p in pairs) / min(p[1] for p in pairs))
  print(f"{len(pairs)} pairs of {config.log_every_steps}-step intervals ({FLAGS.rounds} loop runs, "
        f"each interval after the first with a bare interval timed at its end)")
  print(f"{'':<26} {'loop':>9} {'bare':>9}   ratio loop/bare: {'q1':>5} {'median':>6} {'q3':>5}"
        f" {'fastest':>7}")
  med = lambda i: statistics.median(p[i] for p in pairs)
  print(f"{'steps/s':<26} {med(0):>9.1f} {med(2):>9.1f}   {'':>16} "
        + " ".join(f"{x:.3f}" for x in quartiles(rate)) + f" {best[0]:>7.3f}")
  print(f"{'host CPU ms/step (inverse)':<26} {1e3 * med(1):>9.3f} {1e3 * med(3):>9.3f}   {'':>16} "
        + " ".join(f"{x:.3f}" for x in quartiles(cpu)) + f" {best[1]:>7.3f}")
  print("(medians over pairs; fastest: the ratio of the fastest interval of each, the least CPU "
        "a step: other load on the machine only slows a run down)")
  print(json.dumps({"steps": total, "reads_before_first_step": reads[0],
                    "reads_on_other_steps": sum(stray.values()), "pairs": len(pairs),
                    "steps_per_s_ratio_quartiles": [round(x, 3) for x in quartiles(rate)],
                    "steps_per_s_ratio_fastest": round(best[0], 3),
                    "cpu_per_step_ratio_quartiles": [round(x, 3) for x in quartiles(cpu)],
                    "cpu_per_step_ratio_fastest": round(best[1], 3)}))


if __name__ == "__main__":
  app.run(main)
