"""Re-evaluates a checkpoint of a training workdir with its config's final evaluators.

  python launch/evaluate.py --workdir=runs/du2mce [--checkpoint=best|latest|STEP]

Writes WORKDIR/eval_<evaluator>_stepN.json.
"""

from absl import flags

from sempre_jax import cli
from sempre_jax.analysis import workdir

cli.define_checkpoint_flags()
FLAGS = flags.FLAGS


def main():
  workdir.evaluate(FLAGS.workdir, FLAGS.checkpoint)


if __name__ == "__main__":
  cli.run(main)
