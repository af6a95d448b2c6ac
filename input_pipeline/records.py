"""What is a split on disk, and how is it read back safely?

A split is a sequence of blocks of posts, one record per block: block j holds
the split's posts j*B .. (j+1)*B - 1 (B = the split's `block_posts`; only the
last block is shorter) and is record j // S of shard j % S (S shards).
Records are framed as TFRecord files (length, masked CRC32C of the length,
payload, masked CRC32C of the payload), so TensorFlow's
`tf.data.TFRecordDataset` reads the shards too. Each shard has an offsets
sidecar (`<shard>.index`, int64 little-endian) for random access, and a
dataset directory has one `metadata.json` describing all splits.

Block payload (little-endian):
  n          uint32          posts in the block
  ids_bytes  uint32          length of `ids`
  rows       POST[n]         one fixed row per post (below)
  id_ends    int32[n]        end of each post id in `ids`
  ids        bytes           the original post ids, UTF-8, concatenated

POST row, 104 bytes, int32-aligned: n rows viewed as int32 [n, ROW_INTS] are
the whole training input of n posts (the step unpacks it, loader.post_fields):
  user       int32            user index in [0, num_users)
  image_id   int32            unique-image index, -1 when no image
  text_hash  int64            hash of the cleaned text (duplicate-aware negatives)
  timestamp  int64            unix seconds
  tokens     int32[MAX_LEN]   token ids, 0 = padding
The masks follow from a row: text_mask = tokens != PAD_ID, image_mask =
image_id >= 0.

Image inputs are frozen (the paper's design), so they are not in the records
but in tables indexed by image id, written once and memory-mapped on read:
  image_features.npy  float32 [num_images, feature_dim]  (feature_dim > 0)
  image_pixels.npy    uint8 [num_images, S, S, 3]        (image_size S > 0;
                      zeros for an image known by its features only)
(A planted topic is not a record field: the truth keys it by post id, oracle.py.)
"""

import hashlib
import io
import json
import os
import struct
import zipfile
from collections.abc import Iterable, Iterator, Mapping, Sequence

import google_crc32c
import numpy as np
from PIL import Image

MAX_LEN = 20
PAD_ID = 0
UNK_ID = 1
BLOCK_POSTS = 1024             # posts per record (prepare's --block_posts)
METADATA_FILE = "metadata.json"
VOCAB_FILE = "vocab.txt"       # word of each token id, one a line
USERS_FILE = "users.txt"       # original id of each user index, one a line
INTERESTS_FILE = "interests.txt"  # interest labels of each user index, tab-separated
GRAPH_FILE = "graph.npz"       # follows and actions (input_pipeline/interactions.py)
TABLE_FILES = {"image_features": "image_features.npy", "image": "image_pixels.npy"}
SPLITS = ("train", "validation", "test")
FORMAT_VERSION = 2             # 1: one tf.train.Example per post, images inside

POST = np.dtype([("user", "<i4"), ("image_id", "<i4"), ("text_hash", "<i8"),
                 ("timestamp", "<i8"), ("tokens", "<i4", (MAX_LEN,))])
ROW_INTS = POST.itemsize // 4

_MASK_DELTA = 0xA282EAD8
_HEADER = struct.Struct("<Q")
_CRC = struct.Struct("<I")
_BLOCK = struct.Struct("<II")


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


# ------------------------------------------------------------------- posts --

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


def post_rows(user: np.ndarray, image_id: np.ndarray, timestamp: np.ndarray,
              tokens: np.ndarray) -> np.ndarray:
  """Columns of N posts (tokens [N, MAX_LEN], 0-padded) -> POST rows [N]."""
  rows = np.zeros(len(user), POST)
  rows["user"], rows["image_id"], rows["timestamp"] = user, image_id, timestamp
  rows["tokens"] = tokens
  rows["text_hash"] = [text_hash(t) for t in rows["tokens"]]
  return rows


def rows_of(posts: Sequence[Mapping]) -> tuple[np.ndarray, list[str]]:
  """Post dicts (post_id, user, tokens, optional image_id and timestamp) ->
  (POST rows, post ids), for write_split."""
  rows = post_rows([p["user"] for p in posts], [p.get("image_id", -1) for p in posts],
                   [p.get("timestamp", 0) for p in posts],
                   np.reshape([pad_tokens(p.get("tokens", ())) for p in posts], [-1, MAX_LEN]))
  return rows, [p["post_id"] for p in posts]


def rechunk(chunks: Iterable[tuple[np.ndarray, Sequence]],
            size: int) -> Iterator[tuple[np.ndarray, list]]:
  """(POST rows, post ids) chunks of any sizes -> the same posts in chunks of
  `size` (the last one shorter)."""
  rows, ids = np.zeros(0, POST), []
  for more_rows, more_ids in chunks:
    rows, ids = np.concatenate([rows, more_rows]), ids + list(more_ids)
    while len(rows) >= size:
      yield rows[:size], ids[:size]
      rows, ids = rows[size:], ids[size:]
  if len(rows):
    yield rows, ids


def encode_block(rows: np.ndarray, post_ids: Sequence[str | bytes]) -> bytes:
  """POST rows [n] and their post ids (str, or UTF-8 bytes as SplitReader.block
  gives them) -> one record's payload."""
  ids = [p if isinstance(p, bytes) else str(p).encode("utf-8") for p in post_ids]
  ends = np.cumsum([0] + [len(i) for i in ids], dtype="<i4")[1:]
  return (_BLOCK.pack(len(rows), int(ends[-1]) if len(ids) else 0)
          + np.ascontiguousarray(rows, POST).tobytes() + ends.tobytes() + b"".join(ids))


def encode_png(pixels: np.ndarray) -> bytes:
  """uint8 [H, W, 3] -> PNG bytes."""
  buf = io.BytesIO()
  Image.fromarray(pixels, "RGB").save(buf, format="PNG")
  return buf.getvalue()


# ------------------------------------------------------------------- write --

def shard_name(split: str, index: int, count: int) -> str:
  return f"{split}-{index:05d}-of-{count:05d}.tfrecord"


def write_split(directory: str, split: str, chunks: Iterable[tuple[np.ndarray, Sequence]],
                num_shards: int, block_posts: int = BLOCK_POSTS) -> dict:
  """Streams the posts of `chunks` ((POST rows, post ids) in split order, any
  sizes) as blocks of `block_posts` into `num_shards` shards (with `.index`);
  returns the split's metadata."""
  names = [shard_name(split, i, num_shards) for i in range(num_shards)]
  files = [open(os.path.join(directory, n), "wb") for n in names]
  offsets, posts = [[] for _ in names], [0] * num_shards
  try:
    for j, (rows, ids) in enumerate(rechunk(chunks, block_posts)):
      f = files[j % num_shards]
      offsets[j % num_shards].append(f.tell())
      f.write(frame(encode_block(rows, ids)))
      posts[j % num_shards] += len(rows)
  finally:
    for f in files:
      f.close()
  for name, offs in zip(names, offsets):
    np.asarray(offs, dtype="<i8").tofile(os.path.join(directory, name) + ".index")
  return {"num_posts": sum(posts), "shards": names, "shard_sizes": posts,
          "block_posts": block_posts, "num_blocks": sum(map(len, offsets))}


def new_table(directory: str, key: str, shape: tuple, dtype) -> np.ndarray:
  """A new image table file of batch key `key`, memory-mapped for writing
  (read back with read_table)."""
  return np.lib.format.open_memmap(table_path(directory, key), "w+", dtype, shape)


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


# -------------------------------------------------------------------- read --

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
    raise ValueError(f"{directory} was prepared in record format "
                     f"{meta.get('format_version')}, this code reads format "
                     f"{FORMAT_VERSION}: prepare it again (launch/prepare_data.py)")
  return meta


def table_path(directory: str, key: str) -> str:
  """The file of the image table of batch key `key` ("image_features", "image")."""
  return os.path.join(directory, TABLE_FILES[key])


def read_table(directory: str, metadata: Mapping, key: str) -> np.ndarray:
  """The image table of `key`, memory-mapped: image_features float32
  [num_images, feature_dim] (zeros [num_images, 0] without features), image
  uint8 [num_images, S, S, 3] (ValueError without pixels)."""
  n, dim, size = metadata["num_images"], metadata["feature_dim"], metadata["image_size"]
  if key == "image" and not size:
    raise ValueError(f"{directory} has no pixels (metadata image_size 0): "
                     "model.image_input='pixels' needs data prepared from image files")
  shape, dtype = (((n, dim), np.float32) if key == "image_features"
                  else ((n, size, size, 3), np.uint8))
  if n == 0 or shape[1] == 0:
    return np.zeros(shape, dtype)
  table = np.load(table_path(directory, key), mmap_mode="r")
  if table.shape != shape or table.dtype != dtype:
    raise ValueError(f"{table_path(directory, key)} is {table.dtype} {list(table.shape)}, "
                     f"metadata.json says {np.dtype(dtype)} {list(shape)}: prepare it again")
  return table


class SplitReader:
  """The blocks of one split (its metadata entry): `num_blocks`, `sizes` and
  the CRC-checked block j as POST rows (`rows`) or rows and post ids (`block`)."""

  def __init__(self, directory: str, split: Mapping):
    self.paths = [os.path.join(directory, s) for s in split["shards"]]
    self._offsets = [np.fromfile(p + ".index", dtype="<i8") for p in self.paths]
    self.num_blocks = sum(map(len, self._offsets))
    n, b = split["num_posts"], split["block_posts"]
    if self.num_blocks != -(-n // b):
      raise CorruptRecordError(f"{directory}: the .index files of {split['shards']} list "
                               f"{self.num_blocks} blocks, not the {-(-n // b)} of "
                               f"{n} posts in blocks of {b}")
    self.block_posts = b                     # post i of the split is in block i // b
    self.sizes = np.minimum(b, n - b * np.arange(self.num_blocks))   # posts per block
    self._fds = [os.open(p, os.O_RDONLY) for p in self.paths]

  def _payload(self, j: int) -> tuple[bytes, int]:
    s, r = j % len(self.paths), j // len(self.paths)
    payload = read_framed(self._fds[s], int(self._offsets[s][r]), self.paths[s], r)
    n, ids_bytes = _BLOCK.unpack_from(payload)
    if n != self.sizes[j] or len(payload) != _BLOCK.size + n * (POST.itemsize + 4) + ids_bytes:
      raise CorruptRecordError(f"{self.paths[s]}: record {r} holds {n} posts in "
                               f"{len(payload)} bytes, not a block of {self.sizes[j]}")
    return payload, n

  def rows(self, j: int) -> np.ndarray:
    """Block j's POST rows [n] (read-only)."""
    payload, n = self._payload(j)
    return np.frombuffer(payload, POST, n, _BLOCK.size)

  def block(self, j: int) -> tuple[np.ndarray, list[bytes]]:
    """Block j's POST rows [n] and post ids (UTF-8 bytes)."""
    payload, n = self._payload(j)
    at = _BLOCK.size + n * POST.itemsize
    ends = np.frombuffer(payload, "<i4", n, at).tolist()
    ids = payload[at + 4 * n:]
    return (np.frombuffer(payload, POST, n, _BLOCK.size),
            [ids[a:e] for a, e in zip([0] + ends, ends)])

  def close(self) -> None:
    for fd in self._fds:
      os.close(fd)
    self._fds = []
