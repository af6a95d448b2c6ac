"""User-interest prediction (the paper's Table 3) from a workdir's checkpoint.

  python launch/interests.py --workdir=runs/du2mce [--checkpoint=best|latest|STEP] \
      [--folds=5] [--user_vectors=output|table]

Prints the cross-validated F1 of a linear SVM per interest on the user
embeddings, beside the averaged word-vector (and image-feature) baselines,
and writes WORKDIR/interests_stepN.json. The data needs interests.txt (the
embedded corpus has one; launch/prepare_data.py --interest_field=FIELD). The
same evaluator can run during training: config.evals.<name> = {"type":
"interests", "every_steps": N, "folds": 5}.
"""

import json
import os

from absl import flags

from sempre_jax import cli
from sempre_jax.analysis import workdir

cli.define_checkpoint_flags()
flags.DEFINE_integer("folds", 5, "Cross-validation folds (stratified, shuffled, seed 0).")
flags.DEFINE_enum("user_vectors", "output", ["output", "table"], "The model's user "
                  "features: the user tower's normalised output, or its table row.")
FLAGS = flags.FLAGS


def main():
  evaluator, results, step = workdir.run_evaluator(
      FLAGS.workdir, FLAGS.checkpoint,
      {"type": "interests", "folds": FLAGS.folds, "user_vectors": FLAGS.user_vectors})
  suffix = "" if FLAGS.user_vectors == "output" else f"_{FLAGS.user_vectors}"
  path = os.path.join(FLAGS.workdir, f"interests_step{step}{suffix}.json")
  with open(path, "w") as f:
    json.dump({**results, "workdir": os.path.abspath(FLAGS.workdir), "step": step}, f,
              indent=1)
  print(f"User interests from the checkpoint at step {step} of {FLAGS.workdir}: "
        f"linear SVM (C=1) per interest, {FLAGS.folds}-fold cross-validated F1")
  print(evaluator.format(results))
  print(f"(written to {path})")


if __name__ == "__main__":
  cli.run(main)
