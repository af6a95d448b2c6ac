"""Re-evaluates a checkpoint of a training workdir on its evaluation split.

  python launch/evaluate.py --workdir=runs/du2mce [--checkpoint=best|latest|STEP]
"""

import sys

from absl import app, flags, logging

from sempre_jax import train

flags.DEFINE_string("workdir", None, "A workdir written by launch/train.py.")
flags.DEFINE_string("checkpoint", "best", "'best' (on validation), 'latest' or a step number.")
flags.mark_flags_as_required(["workdir"])
FLAGS = flags.FLAGS


def main(argv):
  del argv
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  try:
    train.evaluate_checkpoint(FLAGS.workdir, FLAGS.checkpoint)
  except (FileNotFoundError, ValueError) as e:
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  app.run(main)
