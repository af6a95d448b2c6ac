"""What do the command-line tools share?

Their --workdir and --checkpoint flags, the fields a posts file is read by
(prepare_data, embed), warnings-only logging unless --verbosity is given, and
data errors (FileNotFoundError, ValueError) shown as one `error: ...` line with
a non-zero exit code instead of a traceback.
"""

import sys
from collections.abc import Callable

from absl import app, flags, logging


def define_checkpoint_flags() -> None:
  flags.DEFINE_string("workdir", None, "A workdir written by launch/train.py.")
  flags.DEFINE_string("checkpoint", "best",
                      "'best' (on validation), 'latest' or a step number.")
  flags.mark_flag_as_required("workdir")


def define_crawl_flags(defaults) -> None:
  """The fields a posts file is read by (input_pipeline.prepare.Options
  `defaults`): for launch/prepare_data.py and launch/embed.py."""
  flags.DEFINE_string("id_field", defaults.id_field, "Field of the post id.")
  flags.DEFINE_string("user_field", defaults.user_field, "Field of the user id.")
  flags.DEFINE_list("text_fields", list(defaults.text_fields), "Fields joined into the text.")
  flags.DEFINE_string("image_field", defaults.image_field, "Field of the image path.")


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
