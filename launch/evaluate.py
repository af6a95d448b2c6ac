"""Re-evaluates a checkpoint of a training workdir on its evaluation split.

  python launch/evaluate.py --workdir=runs/du2mce [--checkpoint=best|latest|STEP]

Writes WORKDIR/eval_<split>_stepN.json.
"""

from absl import flags

from sempre_jax import cli, train

cli.define_checkpoint_flags()
FLAGS = flags.FLAGS


def main():
  train.evaluate_checkpoint(FLAGS.workdir, FLAGS.checkpoint)


if __name__ == "__main__":
  cli.run(main)
