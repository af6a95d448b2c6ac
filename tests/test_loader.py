"""Per-process shuffled batches, epoch coverage, and resumable iterator state."""

import os
import shutil

import numpy as np
import pytest

from input_pipeline import embedded, loader, records

SPEC = dict(num_users=20, num_topics=4, posts_per_user=12, feature_dim=8, seed=1)


def _prepared(root: str, num_shards: int) -> tuple[str, dict]:
  d = embedded.ensure(SPEC, {"test": 0.1}, num_shards=num_shards, word2vec_dim=0, seed=0,
                      root=root, log=lambda *a: None)
  return d, records.read_metadata(d)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  return _prepared(str(tmp_path_factory.mktemp("data")), num_shards=4)


@pytest.fixture(scope="module")
def two_shards(tmp_path_factory):
  return _prepared(str(tmp_path_factory.mktemp("two_shards")), num_shards=2)


def _iterator(data, batch_size=10, **kw):
  d, meta = data
  return loader.train_iterator(d, meta, batch_size=batch_size, image_input="features",
                               image_key="image_features", seed=0, **kw)


def _ids(batch):
  # (user, text hash, image id) identifies a record here.
  return list(zip(batch["user"], batch["text_hash"], batch["image_id"]))


def test_batches_have_model_fields_and_fixed_shapes(data):
  batch = next(_iterator(data))
  assert batch["tokens"].shape == (10, 20) and batch["tokens"].dtype == np.int32
  assert batch["image_features"].shape == (10, 8)
  assert batch["text_hash"].dtype == np.int32 and "post_id" not in batch


def test_one_epoch_visits_every_record_once_then_reshuffles(data):
  n = data[1]["splits"]["train"]["num_posts"]
  it = _iterator(data, batch_size=1)
  first = [_ids(next(it))[0] for _ in range(n)]
  second = [_ids(next(it))[0] for _ in range(n)]
  assert sorted(first) == sorted(second)
  assert first != second
  # Duplicated ids are possible only for identical posts; the set is complete.
  assert len(set(first)) >= n - 2


def test_processes_read_disjoint_shards(data):
  n = data[1]["splits"]["train"]["num_posts"]
  parts = []
  for p in range(2):
    it = _iterator(data, batch_size=1, process_index=p, process_count=2)
    size = sum(data[1]["splits"]["train"]["shard_sizes"][p::2])
    parts.append([_ids(next(it))[0] for _ in range(size)])
  assert len(parts[0]) + len(parts[1]) == n
  assert not set(parts[0]) & set(parts[1])


def test_restored_state_replays_the_same_batches(data):
  it = _iterator(data)
  for _ in range(7):
    next(it)
  state = it.get_state()
  expected = [_ids(next(it)) for _ in range(5)]
  fresh = _iterator(data)
  fresh.set_state(state)
  assert [_ids(next(fresh)) for _ in range(5)] == expected


def test_too_few_shards_for_the_processes_is_an_error(data):
  with pytest.raises(ValueError, match="train shards"):
    _iterator(data, process_index=5, process_count=6)


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_damaged_shard_fails_with_file_and_record(two_shards, tmp_path, damage):
  d = shutil.copytree(two_shards[0], str(tmp_path / "data"))
  meta = two_shards[1]
  shard = os.path.join(d, meta["splits"]["train"]["shards"][1])
  data = bytearray(open(shard, "rb").read())
  offsets = np.fromfile(shard + ".index", dtype="<i8")
  if damage == "truncate":
    data = data[:offsets[-1] + 30]
  else:
    data[offsets[3] + 40] ^= 0x01
  open(shard, "wb").write(bytes(data))
  it = loader.train_iterator(d, meta, batch_size=8, image_input="features",
                             image_key="image_features", seed=0)
  record = len(offsets) - 1 if damage == "truncate" else 3
  with pytest.raises(records.CorruptRecordError,
                     match=rf"{os.path.basename(shard)}: record {record} "):
    for _ in range(2 * meta["splits"]["train"]["num_posts"]):
      next(it)
