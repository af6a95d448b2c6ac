"""Trains and evaluates several configs on the same data and prints one table.

  python launch/compare.py --workdir=runs/compare \
      --configs=configs/du2mce.py:tu,configs/du2mce.py:tu+it,configs/du2mce.py \
      [--override=num_epochs=4 --override=data.embedded.num_users=200]

Each config trains in WORKDIR/<name>_<variant> (an existing one resumes);
the table is also written to WORKDIR/compare.txt.
"""

import ast
import os
import sys

from absl import app, flags, logging

from sempre_jax import train
from sempre_jax.analysis import comparison

flags.DEFINE_list("configs", None, "Config files, each optionally with :variant.")
flags.DEFINE_string("workdir", "runs/compare", "Parent of the runs' workdirs.")
flags.DEFINE_multi_string("override", [], "key=value applied to every config "
                          "(dotted keys, Python literals).")
flags.mark_flags_as_required(["configs"])
FLAGS = flags.FLAGS


def _override(text: str) -> tuple[str, object]:
  key, sep, value = text.partition("=")
  if not sep:
    raise ValueError(f"--override needs key=value, got {text!r}")
  try:
    return key, ast.literal_eval(value)
  except (ValueError, SyntaxError):
    return key, value


def main(argv):
  del argv
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  try:
    overrides = dict(_override(o) for o in FLAGS.override)
    runs = comparison.run_all(FLAGS.configs, FLAGS.workdir, overrides)
  except (FileNotFoundError, ValueError, KeyError, AttributeError) as e:
    sys.exit(f"error: {e}")
  except train.TrainingStopped as e:
    sys.exit(f"Training stopped: {e}")
  table = comparison.format_tables(runs)
  print("\n" + table)
  with open(os.path.join(FLAGS.workdir, "compare.txt"), "w") as f:
    f.write(table + "\n")


if __name__ == "__main__":
  app.run(main)
