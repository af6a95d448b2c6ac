"""Trains a model (resuming from the workdir's latest checkpoint) and evaluates it.

  python launch/train.py --config=configs/du2mce.py [--workdir=DIR] [--config.x=y]

With no --config.data.dir, the embedded corpus is generated as a raw crawl in
WORKDIR/crawl and prepared into WORKDIR/data by the same code as
launch/prepare_data.py (the command is printed), then trained on.
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "A configs/*.py file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Checkpoints, logs and results "
                    "(default: runs/<config file name>).")
flags.DEFINE_bool("distributed", False, "Join a multi-process job, found from the "
                  "cluster's environment (TPU pod slice, SLURM, ...).")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for a "
                    "multi-process job started by hand (with the two flags below).")
flags.DEFINE_integer("num_processes", None, "Processes in the job.")
flags.DEFINE_integer("process_id", None, "This process's index in the job.")
flags.mark_flags_as_required(["config"])
FLAGS = flags.FLAGS


def main(argv):
  del argv
  import jax   # imported after flag parsing: --help answers at once
  from jax.experimental import multihost_utils

  from input_pipeline import embedded, records
  from sempre_jax import train
  if not FLAGS["verbosity"].present:   # library INFO logs (orbax, grain) only on request
    logging.set_verbosity(logging.WARNING)
  if FLAGS.distributed or FLAGS.coordinator_address:
    jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes,
                               FLAGS.process_id)
  config = FLAGS.config
  name = os.path.splitext(os.path.basename(config_flags.get_config_filename(FLAGS["config"])))[0]
  workdir = FLAGS.workdir or os.path.join("runs", name)
  try:
    data_dir = config.data.dir
    if not data_dir:                   # the embedded corpus, made by process 0
      if jax.process_index() == 0:
        embedded.for_config(config, workdir)
      multihost_utils.sync_global_devices("embedded corpus")
      data_dir = embedded.data_dir(workdir)
    train.train_and_evaluate(config, workdir, data_dir, records.read_metadata(data_dir))
  except (ValueError, FileNotFoundError) as e:
    sys.exit(f"error: {e}")
  except train.TrainingStopped as e:
    sys.exit(f"Training stopped: {e}")


if __name__ == "__main__":
  app.run(main)
