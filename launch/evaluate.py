"""Re-evaluates a checkpoint of a training workdir with its config's final evaluators,
on its own data or on another prepared dataset.

  python launch/evaluate.py --workdir=runs/du2mce [--checkpoint=best|latest|STEP]
  python launch/evaluate.py --workdir=runs/du2mce --data=NEW_DATA \
      [--cold_start=none|avg_text|fold_in]

--data ranks NEW_DATA's split (prepared with launch/prepare_data.py
--vocab_from=the workdir's data) with the final retrieval evaluators; users
unknown to the model are left out unless --cold_start gives them a vector from
their posts of NEW_DATA's train split (sempre_jax/analysis/newdata.py).
Writes WORKDIR/eval_<evaluator>_stepN[_<data>[_<cold start>]].json.
"""

from absl import flags

from sempre_jax import cli
from sempre_jax.analysis import coldstart, newdata, workdir

cli.define_checkpoint_flags()
flags.DEFINE_string("data", None, "Another prepared dataset to rank (--vocab_from the "
                    "workdir's data).")
flags.DEFINE_enum("cold_start", "none", coldstart.METHODS, "With --data: vectors for the "
                  "users unknown to the model, from their posts of the data's train split.")
flags.DEFINE_integer("fold_in_steps", 100, "Adam steps of fold-in.")
flags.DEFINE_float("fold_in_learning_rate", 0.0, "Adam learning rate of fold-in (0: the "
                   "config's learning_rate, the rate the user rows trained with).")
FLAGS = flags.FLAGS


def main():
  if FLAGS.data:
    newdata.evaluate(FLAGS.workdir, FLAGS.data, FLAGS.checkpoint, FLAGS.cold_start,
                     steps=FLAGS.fold_in_steps, learning_rate=FLAGS.fold_in_learning_rate)
  elif FLAGS.cold_start != "none":
    raise ValueError("--cold_start needs --data (users unknown to the model)")
  else:
    workdir.evaluate(FLAGS.workdir, FLAGS.checkpoint)


if __name__ == "__main__":
  cli.run(main)
