"""Training streams (post-level shuffle, epochs, any number of processes, exact
resume), the rows' unpacking and image gather, evaluation batches."""

import os
import shutil

import numpy as np
import pytest

from input_pipeline import embedded, loader, records

SPEC = dict(num_users=20, num_topics=4, posts_per_user=12, feature_dim=8, seed=1)


def _prepared(root: str, num_shards: int) -> tuple[str, dict]:
  d = embedded.ensure(SPEC, {"test": 0.1}, num_shards=num_shards, word2vec_dim=0, seed=0,
                      root=root, log=lambda *a: None, block_posts=8)
  return d, records.read_metadata(d)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  return _prepared(str(tmp_path_factory.mktemp("two_shards")), num_shards=2)


def _iterator(data, batch_size=10, **kw):
  d, meta = data
  return iter(loader.train_dataset(d, meta, batch_size=batch_size, seed=0, **kw))


def _eval_posts(data, split="train", image_input="features"):
  batches = list(loader.eval_batches(*data, split, 7, image_input))
  return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}, batches


def _keys(rows):
  """Each row's bytes: identifies a post (timestamps differ)."""
  return [r.tobytes() for r in np.asarray(rows)]


def _train_keys(data):
  posts, _ = _eval_posts(data)
  rows = np.zeros(len(posts["user"]), records.POST)
  for k in ("user", "image_id", "text_hash", "timestamp", "tokens"):
    rows[k] = posts[k]
  return _keys(rows.view(np.int32).reshape(len(rows), records.ROW_INTS))


def test_eval_batches_give_every_post_in_order_with_its_features(data):
  d, meta = data
  posts, batches = _eval_posts(data)
  n = meta["splits"]["train"]["num_posts"]
  assert [len(b["user"]) for b in batches] == [7] * (n // 7) + [n % 7] * (n % 7 > 0)
  assert len(set(posts["post_id"])) == n and isinstance(posts["post_id"][0], bytes)
  assert len(set(_train_keys(data))) == n
  assert posts["text_hash"].dtype == np.int64 and posts["image_id"].dtype == np.int64
  np.testing.assert_array_equal(posts["text_mask"], posts["tokens"] != 0)
  np.testing.assert_array_equal(posts["image_mask"], posts["image_id"] >= 0)
  assert posts["image_mask"].any() and not posts["image_mask"].all()
  features = np.load(records.table_path(d, "image_features"))
  with_image = posts["image_mask"]
  np.testing.assert_array_equal(posts["image_features"][with_image],
                                features[posts["image_id"][with_image]])
  assert not posts["image_features"][~with_image].any()
  assert set(_eval_posts(data, image_input=None)[0]) == set(posts) - {"image_features"}


def test_model_inputs_unpack_rows_and_gather_features(data):
  d, meta = data
  rows = next(_iterator(data))["posts"]
  assert rows.shape == (10, records.ROW_INTS) and rows.dtype == np.int32
  table = records.read_table(d, meta, "image_features")
  batch = loader.model_inputs(rows, loader.host_gather({"image_features": table}))
  structured = np.ascontiguousarray(rows).view(records.POST)[:, 0]
  h = structured["text_hash"]
  np.testing.assert_array_equal(batch["text_hash"], (h ^ (h >> 32)).astype(np.int32))
  np.testing.assert_array_equal(batch["tokens"], structured["tokens"])
  np.testing.assert_array_equal(batch["user"], structured["user"])
  np.testing.assert_array_equal(batch["text_mask"], structured["tokens"] != 0)
  has = structured["image_id"] >= 0
  np.testing.assert_array_equal(batch["image_mask"], has)
  np.testing.assert_array_equal(batch["image_features"][has], table[structured["image_id"][has]])
  assert not batch["image_features"][~has].any()
  assert {k: v.dtype for k, v in batch.items()} == {
      "user": np.int32, "image_id": np.int32, "image_mask": bool, "text_hash": np.int32,
      "tokens": np.int32, "text_mask": bool, "image_features": np.float32}


@pytest.mark.parametrize("window_posts", [8, 1 << 16])
def test_one_epoch_visits_every_record_once_then_reshuffles(data, window_posts):
  n = data[1]["splits"]["train"]["num_posts"]
  it = _iterator(data, batch_size=1, window_posts=window_posts)
  first = [_keys(next(it)["posts"])[0] for _ in range(n)]
  second = [_keys(next(it)["posts"])[0] for _ in range(n)]
  assert sorted(first) == sorted(second) == sorted(_train_keys(data))
  assert first != second


def test_posts_are_shuffled_across_blocks(data):
  order = {k: i for i, k in enumerate(_train_keys(data))}
  rows = next(_iterator(data, batch_size=16))["posts"]
  blocks = {order[k] // 8 for k in _keys(rows)}
  assert len(blocks) > 4            # 16 posts from more than 4 blocks of 8


def test_three_processes_over_two_shards_read_disjoint_blocks_covering_the_split(data):
  reader = loader.split_reader(*data, "train")
  parts = []
  for p in range(3):
    it = _iterator(data, batch_size=1, process_index=p, process_count=3)
    epoch = int(reader.sizes[p::3].sum())
    parts.append([_keys(next(it)["posts"])[0] for _ in range(epoch)])
    assert len(set(parts[-1])) == epoch
  assert sorted(sum(parts, [])) == sorted(_train_keys(data))
  assert abs(len(parts[0]) - len(parts[2])) <= 8          # within a block


def test_global_batches_depend_on_the_streams_not_the_processes(data):
  one = _iterator(data, batch_size=12, streams=3)
  three = [_iterator(data, batch_size=4, streams=3, process_index=p, process_count=3)
           for p in range(3)]
  for _ in range(40):                                      # past epoch ends
    np.testing.assert_array_equal(next(one)["posts"],
                                  np.concatenate([next(it)["posts"] for it in three]))


@pytest.mark.parametrize("streams,window_posts", [(1, 1 << 16), (3, 16)])
def test_restored_state_replays_the_same_batches(data, streams, window_posts):
  kw = dict(batch_size=9, streams=streams, window_posts=window_posts)
  it = _iterator(data, **kw)
  for skip in (7, 13, 25):        # mid-window, across windows and epochs
    for _ in range(skip):
      next(it)
    state = it.get_state()
    expected = [next(it)["posts"] for _ in range(5)]
    fresh = _iterator(data, **kw)
    fresh.set_state(state)
    for want in expected:
      np.testing.assert_array_equal(next(fresh)["posts"], want)


def test_stream_and_process_mismatches_are_one_line_errors(data):
  with pytest.raises(ValueError, match="cannot be split evenly over 2 processes"):
    _iterator(data, streams=3, process_count=2)
  with pytest.raises(ValueError, match="fewer than the 40 data streams: prepare it with a "
                                       "smaller --block_posts"):
    _iterator(data, batch_size=40, streams=40)
  it = _iterator(data)
  with pytest.raises(ValueError, match="for 2 streams, this run reads 1"):
    it.set_state({"posts": 3, "streams": 2})


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_damaged_shard_fails_with_file_and_record(data, tmp_path, damage):
  d = shutil.copytree(data[0], str(tmp_path / "data"))
  meta = data[1]
  shard = os.path.join(d, meta["splits"]["train"]["shards"][1])
  raw = bytearray(open(shard, "rb").read())
  offsets = np.fromfile(shard + ".index", dtype="<i8")
  if damage == "truncate":
    raw = raw[:offsets[-1] + 30]
  else:
    raw[offsets[3] + 40] ^= 0x01
  open(shard, "wb").write(bytes(raw))
  it = iter(loader.train_dataset(d, meta, batch_size=8, seed=0))
  record = len(offsets) - 1 if damage == "truncate" else 3
  with pytest.raises(records.CorruptRecordError,
                     match=rf"{os.path.basename(shard)}: record {record} "):
    for _ in range(2 * meta["splits"]["train"]["num_posts"]):
      next(it)
