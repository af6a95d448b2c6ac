"""What do the command-line tools on a workdir's checkpoint share?

Their --workdir and --checkpoint flags, warnings-only logging unless
--verbosity is given, and data errors (FileNotFoundError, ValueError) shown
as one `error: ...` line with a non-zero exit code instead of a traceback.
"""

import sys
from collections.abc import Callable

from absl import app, flags, logging


def define_checkpoint_flags() -> None:
  flags.DEFINE_string("workdir", None, "A workdir written by launch/train.py.")
  flags.DEFINE_string("checkpoint", "best",
                      "'best' (on validation), 'latest' or a step number.")
  flags.mark_flag_as_required("workdir")


def run(main: Callable[[], None]) -> None:
  """app.run(main) with the logging and errors above."""
  def body(argv):
    del argv
    if not flags.FLAGS["verbosity"].present:
      logging.set_verbosity(logging.WARNING)
    try:
      main()
    except (FileNotFoundError, ValueError) as e:
      sys.exit(f"error: {e}")
  app.run(body)
