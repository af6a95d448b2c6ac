"""User-interest prediction (the paper's Table 3) from a workdir's checkpoint.

  python launch/interests.py --workdir=runs/du2mce [--checkpoint=best|latest|STEP] \
      [--folds=5]

Prints the cross-validated F1 of a linear SVM per interest on the user
embeddings, beside the averaged word-vector (and image-feature) baselines,
and writes WORKDIR/interests_stepN.json. The data needs interests.txt (the
embedded corpus has one; launch/prepare_data.py --interest_field=FIELD).
"""

import os

from absl import flags

from sempre_jax import cli
from sempre_jax.analysis import interests

cli.define_checkpoint_flags()
flags.DEFINE_integer("folds", 5, "Cross-validation folds (stratified, shuffled, seed 0).")
FLAGS = flags.FLAGS


def main():
  results = interests.evaluate_workdir(FLAGS.workdir, FLAGS.checkpoint, FLAGS.folds)
  step = results["step"]
  print(f"User interests from the checkpoint at step {step} of {FLAGS.workdir}: "
        f"linear SVM (C=1) per interest, {FLAGS.folds}-fold cross-validated F1")
  print(interests.format_table(results))
  print(f"(written to {os.path.join(FLAGS.workdir, f'interests_step{step}.json')})")


if __name__ == "__main__":
  cli.run(main)
