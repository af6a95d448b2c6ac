"""What is one training record on disk, and how is it read back safely?

One post = one `tf.train.Example` (built and read with tfds's generated proto: no
TensorFlow needed). Records are framed as TFRecord files
(length, masked CRC32C of the length, payload, masked CRC32C of the payload), so
TensorFlow's `tf.data.TFRecordDataset` reads the shards too. Each shard has an
offsets sidecar (`<shard>.index`, int64 little-endian) for random access, and a
dataset directory has one `metadata.json` describing all splits.

Schema (missing values are filled on parse, see `parse`):
  post_id        bytes            the original post id
  user           int64            user index in [0, num_users)
  tokens         int64[MAX_LEN]   token ids, 0 = padding
  text_mask      int64[MAX_LEN]   1 where tokens holds a word
  text_hash      int64            hash of the cleaned text (duplicate-aware negatives)
  image_mask     int64            1 when the post has an image
  image_id       int64            unique-image index, -1 when no image
  image_features float[F]         frozen-CNN features (optional)
  image_encoded  bytes            PNG/JPEG bytes (optional)
  timestamp      int64            unix seconds
(A planted topic is not a record field: the truth keys it by post id, oracle.py.)
"""

import hashlib
import io
import json
import os
import struct
import zipfile
from collections.abc import Iterable, Mapping, Sequence

import google_crc32c
import numpy as np
from PIL import Image
from tensorflow_datasets.proto import tf_example_pb2, tf_feature_pb2

MAX_LEN = 20
PAD_ID = 0
UNK_ID = 1
METADATA_FILE = "metadata.json"
VOCAB_FILE = "vocab.txt"       # word of each token id, one a line
USERS_FILE = "users.txt"       # original id of each user index, one a line
INTERESTS_FILE = "interests.txt"  # interest labels of each user index, tab-separated
GRAPH_FILE = "graph.npz"       # follows and actions (input_pipeline/interactions.py)
SPLITS = ("train", "validation", "test")
FORMAT_VERSION = 1

_MASK_DELTA = 0xA282EAD8
_HEADER = struct.Struct("<Q")
_CRC = struct.Struct("<I")


class CorruptRecordError(IOError):
  """A shard failed its framing or CRC check; the message names file and record."""


# ------------------------------------------------------------------ framing --

def masked_crc(data: bytes) -> int:
  """TFRecord's masked CRC32C: rotate right by 15 and add a constant."""
  crc = google_crc32c.value(data)
  return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


def frame(payload: bytes) -> bytes:
  """One TFRecord frame around `payload`."""
  header = _HEADER.pack(len(payload))
  return (header + _CRC.pack(masked_crc(header)) + payload
          + _CRC.pack(masked_crc(payload)))


def write_shard(path: str, payloads: Iterable[bytes]) -> int:
  """Writes framed records and the `.index` offsets sidecar; returns the count."""
  offsets = []
  with open(path, "wb") as f:
    for payload in payloads:
      offsets.append(f.tell())
      f.write(frame(payload))
  np.asarray(offsets, dtype="<i8").tofile(path + ".index")
  return len(offsets)


def read_framed(fd: int, offset: int, path: str, index: int) -> bytes:
  """Reads and CRC-checks the record at byte `offset` of an open shard."""
  head = os.pread(fd, 12, offset)
  if len(head) < 12:
    raise CorruptRecordError(f"{path}: record {index} truncated (header)")
  if _CRC.unpack(head[8:])[0] != masked_crc(head[:8]):
    raise CorruptRecordError(f"{path}: record {index} has a bad length CRC")
  (length,) = _HEADER.unpack(head[:8])
  body = os.pread(fd, length + 4, offset + 12)
  if len(body) < length + 4:
    raise CorruptRecordError(f"{path}: record {index} truncated (payload)")
  payload = body[:length]
  if _CRC.unpack(body[length:])[0] != masked_crc(payload):
    raise CorruptRecordError(f"{path}: record {index} has a bad payload CRC")
  return payload


# ------------------------------------------------------------------ schema --

def text_hash(tokens: Sequence[int]) -> int:
  """Stable signed 64-bit hash of a token sequence (0 for an empty text)."""
  tokens = [int(t) for t in tokens if t != PAD_ID]
  if not tokens:
    return 0
  digest = hashlib.blake2b(np.asarray(tokens, "<i8").tobytes(), digest_size=8)
  return int.from_bytes(digest.digest(), "little", signed=True)


def pad_tokens(tokens: Sequence[int], max_len: int = MAX_LEN) -> np.ndarray:
  """Truncates/pads token ids to `[max_len]` with PAD_ID."""
  out = np.full([max_len], PAD_ID, np.int64)
  tokens = np.asarray(tokens, np.int64)[:max_len]
  out[:len(tokens)] = tokens
  return out


def _int64(values) -> tf_feature_pb2.Feature:
  return tf_feature_pb2.Feature(int64_list=tf_feature_pb2.Int64List(
      value=np.atleast_1d(values).astype(np.int64).tolist()))


def _float(values) -> tf_feature_pb2.Feature:
  return tf_feature_pb2.Feature(float_list=tf_feature_pb2.FloatList(
      value=np.asarray(values, np.float32).ravel().tolist()))


def _bytes(value: bytes) -> tf_feature_pb2.Feature:
  return tf_feature_pb2.Feature(bytes_list=tf_feature_pb2.BytesList(value=[value]))


def serialize(post: Mapping) -> bytes:
  """A post dict (keys of the schema; optional ones may be absent) -> Example bytes."""
  tokens = pad_tokens(post.get("tokens", ()))
  feats = {
      "post_id": _bytes(str(post["post_id"]).encode("utf-8")),
      "user": _int64(post["user"]),
      "tokens": _int64(tokens),
      "text_mask": _int64(tokens != PAD_ID),
      "text_hash": _int64(text_hash(tokens)),
      "image_id": _int64(post.get("image_id", -1)),
      "timestamp": _int64(post.get("timestamp", 0)),
  }
  has_image = post.get("image_id", -1) >= 0
  feats["image_mask"] = _int64(int(has_image))
  if has_image and post.get("image_features") is not None:
    feats["image_features"] = _float(post["image_features"])
  if has_image and post.get("image_encoded") is not None:
    feats["image_encoded"] = _bytes(post["image_encoded"])
  example = tf_example_pb2.Example(
      features=tf_feature_pb2.Features(feature=feats))
  return example.SerializeToString(deterministic=True)   # map keys sorted: same bytes


class Parser:
  """Example bytes -> NumPy arrays with fixed shapes (defaults filled in).

  feature_dim: length of `image_features` (None: not parsed; 0: an empty
  [N, 0] array, for data without features); image_size: side of the decoded
  RGB `image` (0: not decoded). Posts without an image get zeros.
  Reads the fields of tfds's generated Example proto directly into
  preallocated batch arrays: tfds's generic NumPy parser spends ~100 us per
  record on bookkeeping, the input pipeline's whole budget.
  """
  INTS = {"user": np.int32, "text_hash": np.int64, "image_mask": bool,
          "image_id": np.int64, "timestamp": np.int64}

  def __init__(self, feature_dim: int | None = None, image_size: int = 0):
    self.feature_dim = feature_dim
    self.image_size = image_size

  def __call__(self, payload: bytes) -> dict[str, np.ndarray]:
    """One record -> {field: array without a batch axis}."""
    return {k: v[0] for k, v in self.batch([payload]).items()}

  def batch(self, payloads: Sequence[bytes]) -> dict[str, np.ndarray]:
    """Records -> {field: [N, ...] array}."""
    n = len(payloads)
    out = {k: np.zeros([n], t) for k, t in self.INTS.items()}
    out["post_id"] = np.empty([n], object)
    out["tokens"] = np.zeros([n, MAX_LEN], np.int32)
    out["text_mask"] = np.zeros([n, MAX_LEN], bool)
    if self.feature_dim is not None:
      out["image_features"] = np.zeros([n, self.feature_dim], np.float32)
    if self.image_size:
      out["image"] = np.zeros([n, self.image_size, self.image_size, 3], np.uint8)
    for i, payload in enumerate(payloads):
      feature = tf_example_pb2.Example.FromString(payload).features.feature
      out["post_id"][i] = feature["post_id"].bytes_list.value[0]
      for key in self.INTS:
        out[key][i] = feature[key].int64_list.value[0]
      out["tokens"][i] = feature["tokens"].int64_list.value
      out["text_mask"][i] = feature["text_mask"].int64_list.value
      if not out["image_mask"][i]:
        continue
      if self.feature_dim and "image_features" in feature:
        out["image_features"][i] = feature["image_features"].float_list.value
      if self.image_size and "image_encoded" in feature:
        out["image"][i] = decode_image(
            feature["image_encoded"].bytes_list.value[0], self.image_size)
    return out


def encode_png(pixels: np.ndarray) -> bytes:
  """uint8 [H, W, 3] -> PNG bytes."""
  buf = io.BytesIO()
  Image.fromarray(pixels, "RGB").save(buf, format="PNG")
  return buf.getvalue()


def decode_image(data: bytes, size: int) -> np.ndarray:
  """Encoded image bytes -> uint8 [size, size, 3] (RGB, resized)."""
  with Image.open(io.BytesIO(data)) as img:
    img = img.convert("RGB")
    if img.size != (size, size):
      img = img.resize((size, size), Image.BILINEAR)
    return np.asarray(img, np.uint8)


# ---------------------------------------------------------------- metadata --

def shard_name(split: str, index: int, count: int) -> str:
  return f"{split}-{index:05d}-of-{count:05d}.tfrecord"


def write_split(directory: str, split: str, posts: Iterable[Mapping],
                num_shards: int) -> dict:
  """Writes posts round-robin into `num_shards` shards; returns the split's metadata."""
  return write_payloads(directory, split, (serialize(p) for p in posts), num_shards)


def write_payloads(directory: str, split: str, payloads: Iterable[bytes],
                   num_shards: int) -> dict:
  """Streams serialized records round-robin into `num_shards` shards (with `.index`)."""
  names = [shard_name(split, i, num_shards) for i in range(num_shards)]
  files = [open(os.path.join(directory, n), "wb") for n in names]
  offsets = [[] for _ in names]
  try:
    for i, payload in enumerate(payloads):
      f = files[i % num_shards]
      offsets[i % num_shards].append(f.tell())
      f.write(frame(payload))
  finally:
    for f in files:
      f.close()
  for name, offs in zip(names, offsets):
    np.asarray(offs, dtype="<i8").tofile(os.path.join(directory, name) + ".index")
  counts = [len(o) for o in offsets]
  return {"num_posts": int(sum(counts)), "shards": names, "shard_sizes": counts}


def write_metadata(directory: str, metadata: Mapping) -> None:
  with open(os.path.join(directory, METADATA_FILE), "w") as f:
    json.dump({"format_version": FORMAT_VERSION, **metadata}, f, indent=1)


def write_lines(directory: str, name: str, items) -> None:
  """One item a line (vocabularies, user ids): line i describes index i."""
  with open(os.path.join(directory, name), "w", encoding="utf-8") as f:
    f.write("".join(f"{item}\n" for item in items))


def save_npz(path: str, **arrays) -> None:
  """np.savez with fixed zip timestamps: the same arrays give the same bytes."""
  with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
    for name, value in arrays.items():
      info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
      with zf.open(info, "w", force_zip64=True) as f:
        np.lib.format.write_array(f, np.asanyarray(value), allow_pickle=False)


def read_lines(directory: str, name: str) -> list[str] | None:
  """The items written by `write_lines`, or None when the file is absent."""
  path = os.path.join(directory, name)
  if not os.path.exists(path):
    return None
  with open(path, encoding="utf-8") as f:
    return f.read().splitlines()


def read_metadata(directory: str) -> dict:
  path = os.path.join(directory, METADATA_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(
        f"{path} not found: {directory!r} is not a prepared dataset "
        "(make one with launch/prepare_data.py)")
  with open(path) as f:
    meta = json.load(f)
  if meta.get("format_version") != FORMAT_VERSION:
    raise ValueError(f"{path}: format_version {meta.get('format_version')} "
                     f"is not {FORMAT_VERSION}")
  return meta


class ShardReader:
  """Random access to the records of some shards: len() and [i] -> payload bytes."""

  def __init__(self, paths: Sequence[str]):
    self.paths = list(paths)
    self._offsets = [np.fromfile(p + ".index", dtype="<i8") for p in self.paths]
    self._starts = np.cumsum([0] + [len(o) for o in self._offsets])
    self._fds = [os.open(p, os.O_RDONLY) for p in self.paths]

  def __len__(self) -> int:
    return int(self._starts[-1])

  def __getitem__(self, index: int) -> bytes:
    shard = int(np.searchsorted(self._starts, index, side="right")) - 1
    local = int(index - self._starts[shard])
    return read_framed(self._fds[shard], int(self._offsets[shard][local]),
                       self.paths[shard], local)

  def close(self) -> None:
    for fd in self._fds:
      os.close(fd)
    self._fds = []
