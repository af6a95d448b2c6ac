"""Record framing, blocks of posts round trip, image tables, and corruption detection."""

import json
import os
import struct

import numpy as np
import pytest

from input_pipeline import records


def test_masked_crc_matches_the_tfrecord_definition():
  # CRC-32C("123456789") = 0xE3069283 (the standard check value); TFRecord masks
  # it as ((c >> 15) | (c << 17)) + 0xa282ead8 (mod 2^32), computed here by hand.
  c = 0xE3069283
  expected = ((((c >> 15) | (c << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF
  assert records.masked_crc(b"123456789") == expected


def test_frame_layout():
  framed = records.frame(b"abc")
  assert struct.unpack("<Q", framed[:8])[0] == 3
  assert framed[12:15] == b"abc"
  assert len(framed) == 8 + 4 + 3 + 4


def _posts(n):
  return [dict(post_id=f"id{i}é", user=i % 3, tokens=[5, 6, 7][: i % 4],
               image_id=i if i % 2 else -1, timestamp=1000 + i) for i in range(n)]


def _split(tmp_path, posts, chunks=(4,), shards=2, block_posts=3):
  """Writes `posts` in chunks cut at `chunks`; returns the split's metadata."""
  cuts = [0, *chunks, len(posts)]
  return records.write_split(str(tmp_path), "s",
                             [records.rows_of(posts[a:b]) for a, b in zip(cuts, cuts[1:])],
                             shards, block_posts)


def test_blocks_hold_the_posts_in_split_order(tmp_path):
  posts = _posts(10)
  meta = _split(tmp_path, posts)
  assert (meta["num_posts"], meta["num_blocks"], meta["shard_sizes"]) == (10, 4, [6, 4])
  reader = records.SplitReader(str(tmp_path), meta)
  np.testing.assert_array_equal(reader.sizes, [3, 3, 3, 1])
  got = [reader.block(j) for j in range(reader.num_blocks)]
  rows = np.concatenate([r for r, _ in got])
  assert [i for _, ids in got for i in ids] == [p["post_id"].encode() for p in posts]
  for row, post in zip(rows, posts):
    n = len(post["tokens"])
    assert (row["user"], row["image_id"], row["timestamp"]) == (
        post["user"], post["image_id"], post["timestamp"])
    np.testing.assert_array_equal(row["tokens"][:n], post["tokens"])
    assert not row["tokens"][n:].any()
    assert row["text_hash"] == records.text_hash(post["tokens"])
    assert (row["text_hash"] == 0) == (n == 0)
  # Block j is record j // 2 of shard j % 2: read the third block by hand.
  path = os.path.join(str(tmp_path), meta["shards"][0])
  offset = np.fromfile(path + ".index", "<i8")[1]
  with open(path, "rb") as f:
    payload = records.read_framed(f.fileno(), int(offset), path, 1)
  n, _ = struct.unpack_from("<II", payload)
  by_hand = np.frombuffer(payload, records.POST, n, 8)
  np.testing.assert_array_equal(by_hand, got[2][0])
  assert records.POST.itemsize == 4 * records.ROW_INTS == 104


def test_blocks_read_back_are_written_again_with_the_same_ids(tmp_path):
  # evaluate --data rewrites a split from SplitReader.block (ids as UTF-8 bytes).
  posts = _posts(5)
  meta = _split(tmp_path, posts)
  reader = records.SplitReader(str(tmp_path), meta)
  again = records.write_split(str(tmp_path), "again",
                              [reader.block(j) for j in range(reader.num_blocks)], 1)
  copy = records.SplitReader(str(tmp_path), again)
  assert copy.block(0)[1] == [p["post_id"].encode() for p in posts]


def test_text_hash_ignores_padding_and_separates_texts():
  assert records.text_hash([3, 4]) == records.text_hash(records.pad_tokens([3, 4]))
  assert records.text_hash([3, 4]) != records.text_hash([4, 3])


def test_flipped_byte_names_file_and_record(tmp_path):
  meta = _split(tmp_path, _posts(10))
  path = os.path.join(str(tmp_path), meta["shards"][1])
  offsets = np.fromfile(path + ".index", dtype="<i8")
  data = bytearray(open(path, "rb").read())
  data[offsets[1] + 20] ^= 0xFF
  open(path, "wb").write(bytes(data))
  reader = records.SplitReader(str(tmp_path), meta)
  reader.rows(0), reader.rows(1), reader.rows(2)
  with pytest.raises(records.CorruptRecordError, match=r"s-00001-of-00002\.tfrecord: record 1 .*CRC"):
    reader.rows(3)


def test_truncated_shard_names_file_and_record(tmp_path):
  meta = _split(tmp_path, _posts(10))
  path = os.path.join(str(tmp_path), meta["shards"][0])
  data = open(path, "rb").read()
  open(path, "wb").write(data[:-10])
  with pytest.raises(records.CorruptRecordError, match="00002.tfrecord: record 1 truncated"):
    records.SplitReader(str(tmp_path), meta).rows(2)


def test_index_that_disagrees_with_the_metadata_is_corrupt(tmp_path):
  meta = _split(tmp_path, _posts(10))
  with pytest.raises(records.CorruptRecordError, match="list 4 blocks, not the 2"):
    records.SplitReader(str(tmp_path), dict(meta, block_posts=5))


def test_a_dataset_of_the_old_format_asks_to_prepare_again(tmp_path):
  with open(tmp_path / records.METADATA_FILE, "w") as f:
    json.dump({"format_version": 1, "splits": {}}, f)
  with pytest.raises(ValueError, match=r"record format 1, this code reads format 2: "
                                        r"prepare it again \(launch/prepare_data.py\)"):
    records.read_metadata(str(tmp_path))


def test_image_tables_are_memory_mapped_and_checked(tmp_path):
  meta = {"num_images": 3, "feature_dim": 2, "image_size": 0}
  features = np.arange(6, dtype=np.float32).reshape(3, 2)
  np.save(records.table_path(str(tmp_path), "image_features"), features)
  table = records.read_table(str(tmp_path), meta, "image_features")
  assert isinstance(table, np.memmap)
  np.testing.assert_array_equal(table, features)
  assert records.read_table(str(tmp_path), dict(meta, feature_dim=0),
                            "image_features").shape == (3, 0)
  with pytest.raises(ValueError, match=r"float32 \[3, 2\], metadata.json says float32 \[4, 2\]"):
    records.read_table(str(tmp_path), dict(meta, num_images=4), "image_features")
  with pytest.raises(ValueError, match="has no pixels"):
    records.read_table(str(tmp_path), meta, "image")
