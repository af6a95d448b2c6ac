"""How does a long job show how far it has got?

One tqdm bar on stderr per pass, in one format everywhere (prepare's passes,
image features, embedding a dataset): done / total, elapsed time, rate and
ETA. `delay` hides passes shorter than that many seconds (so that a job that
fails at once prints only its error).
"""

import sys

import tqdm

BAR_FORMAT = "{desc}: {n_fmt}/{total_fmt} {unit} [{elapsed}, {rate_fmt}, ETA {remaining}]{postfix}"


def bar(total: float, desc: str, unit: str, *, delay: float = 0.0,
        disable: bool = False) -> tqdm.tqdm:
  """A progress bar of `total` `unit`s (e.g. posts, images, bytes)."""
  return tqdm.tqdm(total=total, desc=desc, unit=unit, unit_scale=True, file=sys.stderr,
                   bar_format=BAR_FORMAT, mininterval=1.0, delay=delay, disable=disable,
                   dynamic_ncols=False)
