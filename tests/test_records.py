"""Record framing, schema round trip and corruption detection."""

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


def _post(i, **kw):
  post = dict(post_id=f"id{i}", user=i % 3, tokens=[5, 6, 7][: i % 4],
              image_id=i if i % 2 else -1, timestamp=1000 + i,
              image_features=np.full([4], i, np.float32) if i % 2 else None)
  post.update(kw)
  return post


def test_round_trip_with_missing_modalities(tmp_path):
  posts = [_post(i) for i in range(6)]
  path = str(tmp_path / "s.tfrecord")
  assert records.write_shard(path, map(records.serialize, posts)) == 6
  reader = records.ShardReader([path])
  parse = records.Parser(feature_dim=4)
  for i, post in enumerate(posts):
    ex = parse(reader[i])
    assert ex["post_id"] == post["post_id"].encode()
    assert ex["user"] == post["user"]
    n = len(post["tokens"])
    np.testing.assert_array_equal(ex["tokens"][:n], post["tokens"])
    assert not ex["tokens"][n:].any() and ex["text_mask"].sum() == n
    assert ex["image_mask"] == (post["image_id"] >= 0)
    expected = post["image_features"] if post["image_id"] >= 0 else np.zeros(4)
    np.testing.assert_array_equal(ex["image_features"], expected)
    assert ex["text_hash"] == records.text_hash(post["tokens"])
    assert (ex["text_hash"] == 0) == (n == 0)


def test_text_hash_ignores_padding_and_separates_texts():
  assert records.text_hash([3, 4]) == records.text_hash(records.pad_tokens([3, 4]))
  assert records.text_hash([3, 4]) != records.text_hash([4, 3])


def test_pixels_round_trip(tmp_path):
  pixels = np.random.default_rng(0).integers(0, 255, [8, 8, 3], dtype=np.uint8)
  path = str(tmp_path / "s.tfrecord")
  records.write_shard(path, [records.serialize(
      _post(1, image_encoded=records.encode_png(pixels)))])
  ex = records.Parser(image_size=8)(records.ShardReader([path])[0])
  np.testing.assert_array_equal(ex["image"], pixels)


def _shard(tmp_path, n=3):
  path = str(tmp_path / "s.tfrecord")
  records.write_shard(path, [records.serialize(_post(i)) for i in range(n)])
  return path


def test_flipped_byte_names_file_and_record(tmp_path):
  path = _shard(tmp_path)
  offsets = np.fromfile(path + ".index", dtype="<i8")
  data = bytearray(open(path, "rb").read())
  data[offsets[1] + 20] ^= 0xFF
  open(path, "wb").write(bytes(data))
  reader = records.ShardReader([path])
  reader[0], reader[2]
  with pytest.raises(records.CorruptRecordError, match=r"s\.tfrecord: record 1 .*CRC"):
    reader[1]


def test_truncated_shard_names_file_and_record(tmp_path):
  path = _shard(tmp_path)
  data = open(path, "rb").read()
  open(path, "wb").write(data[:-10])
  with pytest.raises(records.CorruptRecordError, match="record 2 truncated"):
    records.ShardReader([path])[2]
