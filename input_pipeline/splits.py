"""How are posts split into train/validation/test without leakage?

Posts are split by *group*: every post of one group (e.g. all posts that share an
image) lands in the same split, so no image is seen in training and tested.
"""

from collections.abc import Mapping

import numpy as np


def split_by_group(groups: np.ndarray, fractions: Mapping[str, float],
                   seed: int, sizes: np.ndarray | None = None) -> np.ndarray:
  """Assigns each post to a split, whole groups at a time.

  Args:
    groups: [N] int group key per post (posts with equal keys stay together).
    fractions: split name -> fraction of groups, e.g. {"test": 0.2,
      "validation": 0.02}; the rest goes to "train".
    seed: seeds the random order of groups.
    sizes: None, or [N] the size each post adds to its group (e.g. 1 for the
      first post of each image): then a fraction is a share of the total size,
      not of the groups. Groups are taken in random order into the first split
      they still fit in (its running size + theirs <= its share), so a group
      larger than a share always stays in "train" and one giant connected
      group cannot become a held-out split.

  Returns:
    [N] array of split names.
  """
  if sum(fractions.values()) >= 1 or min(fractions.values(), default=0) < 0:
    raise ValueError(f"split fractions {dict(fractions)} must be >= 0 and sum < 1")
  unique, inverse = np.unique(groups, return_inverse=True)
  order = np.random.default_rng(seed).permutation(len(unique))
  group_split = np.full(len(unique), "train", dtype=object)
  if sizes is not None:
    size = np.bincount(inverse, weights=sizes, minlength=len(unique))
    room = {name: fraction * size.sum() for name, fraction in fractions.items()}
    for g in order:
      name = next((n for n, r in room.items() if 0 < size[g] <= r + 1e-9), None)
      if name is not None:
        group_split[g] = name
        room[name] -= size[g]
    return group_split[inverse]
  start = 0
  for name, fraction in fractions.items():
    count = int(round(fraction * len(unique)))
    group_split[order[start:start + count]] = name
    start += count
  return group_split[inverse]
