"""Held-out splits as shares of the groups, or of the images and posts
(`--split_by=size`: small corpora whose groups differ widely in size)."""

import dataclasses

import numpy as np

from input_pipeline import prepare, splits


def test_size_shares_keep_a_giant_group_in_train_and_fill_each_share():
  groups = np.r_[np.zeros(50, int), np.arange(1, 101)]     # one group of 50, 100 of 1
  for seed in range(20):
    out = splits.split_by_group(groups, {"test": 0.15, "validation": 0.15}, seed,
                                sizes=np.ones(len(groups)))
    assert (out[:50] == "train").all()
    for name in ("test", "validation"):
      assert 21 <= (out == name).sum() <= 0.15 * 150          # 22.5 posts of 150
    for g in np.unique(groups):                                # whole groups
      assert len(set(out[groups == g])) == 1


def test_size_shares_count_distinct_images_of_image_groups():
  # 40 groups: group g has g % 4 + 1 distinct images, each posted 3 times.
  image = np.repeat(np.arange(100), 3)
  groups = np.repeat(np.repeat(np.arange(40), np.arange(40) % 4 + 1), 3)
  options = prepare.Options(test_fraction=0.2, validation_fraction=0.2,
                            held_out_authors="any", split_by="size")
  users = np.arange(len(image))
  for seed in range(5):
    out, stats = prepare.assign_splits(groups, image, users,
                                       dataclasses.replace(options, seed=seed))
    assert stats["split_by"] == "size"
    for name in ("test", "validation"):
      assert 17 <= len(np.unique(image[out == name])) <= 20   # 20% of 100 images
  by_groups, _ = prepare.assign_splits(groups, image, users, prepare.Options(
      test_fraction=0.2, validation_fraction=0.2, held_out_authors="any"))
  assert len(np.unique(groups[by_groups == "test"])) == 8     # 20% of 40 groups
