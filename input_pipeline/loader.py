"""How do a split's blocks become batches, resumably, on any number of processes?

Training reads the train split as K streams (K = `streams`, one per process
by default): stream k owns the blocks j with j % K == k, whatever the shard
files. Each epoch of a stream visits its blocks in a seeded random order, in
windows of `window_posts` posts' worth of blocks; the posts of a window are
shuffled together (a post-level shuffle within a buffer of blocks). A global
batch of G posts takes the next G / K posts of every stream, in stream order,
and process p of P feeds the part of streams p K/P .. (p+1) K/P - 1: the
global batches depend on K, never on P. Every stream advances G / K posts a
batch, so one number, the posts each stream has given, is the exact position
of all of them (the iterator state saved with checkpoints; a run may resume
on any P that divides K).

A training batch is {"posts": int32 [b, ROW_INTS]}: the records' rows as
they are (no parsing), sent to the devices in one transfer; `model_inputs`
unpacks them (on the devices, inside the step) and gathers the frozen image
inputs from their tables by image id.

Evaluation: the posts of a split in order, as batches of the old per-post
fields (ids, tokens, masks, image features or pixels from the tables).
"""

import functools
from collections.abc import Callable, Iterator, Mapping, Sequence

import grain
import numpy as np

from input_pipeline import records

WINDOW_POSTS = 1 << 16      # posts shuffled together (whole blocks)


def _columns(name: str) -> slice:
  dtype, offset = records.POST.fields[name][:2]
  return slice(offset // 4, (offset + dtype.itemsize) // 4)


COLUMNS = {name: _columns(name) for name in records.POST.names}   # int32 columns of a row


def post_fields(rows) -> dict:
  """int32 rows [N, ROW_INTS] (NumPy or JAX) -> the step's per-post fields:
  user, image_id, text_hash (the XOR of the int64's halves: JAX runs without
  64-bit ints), tokens [N, MAX_LEN], text_mask, image_mask."""
  c = COLUMNS
  tokens, image_id = rows[:, c["tokens"]], rows[:, c["image_id"].start]
  return {"user": rows[:, c["user"].start], "image_id": image_id, "image_mask": image_id >= 0,
          "text_hash": rows[:, c["text_hash"].start] ^ rows[:, c["text_hash"].start + 1],
          "tokens": tokens, "text_mask": tokens != records.PAD_ID}


def take_rows(table: np.ndarray, ids: np.ndarray) -> np.ndarray:
  """table[ids] on the host, zeros where id < 0 (a post without image)."""
  ids = np.asarray(ids)
  out = np.zeros((len(ids),) + table.shape[1:], table.dtype)
  out[ids >= 0] = table[ids[ids >= 0]]
  return out


def model_inputs(rows, gather: Mapping[str, Callable]) -> dict:
  """Transported rows -> the model's batch: post_fields, plus gather[key](image
  ids) for each image input (its table's rows, zeros where id < 0)."""
  batch = post_fields(rows)
  return batch | {key: take(batch["image_id"]) for key, take in gather.items()}


def host_gather(tables: Mapping[str, np.ndarray]) -> dict[str, Callable]:
  """model_inputs' gather from tables on the host."""
  return {key: functools.partial(take_rows, table) for key, table in tables.items()}


def split_reader(data_dir: str, metadata: Mapping, split: str) -> records.SplitReader:
  if split not in metadata["splits"]:
    raise ValueError(f"split {split!r} not in {data_dir} "
                     f"(has {sorted(metadata['splits'])})")
  return records.SplitReader(data_dir, metadata["splits"][split])


# ---------------------------------------------------------------- training --

def _ints(rows: np.ndarray) -> np.ndarray:
  """POST rows [n] -> the same bytes as int32 [n, ROW_INTS] (a view; NumPy moves
  int32 rows far faster than structured ones)."""
  return rows.view(np.int32).reshape(len(rows), records.ROW_INTS)


class _Stream:
  """The endless shuffled posts of some blocks (see the module), as int32 rows."""

  def __init__(self, reader: records.SplitReader, blocks: np.ndarray, key: Sequence[int],
               window_blocks: int):
    self.reader, self.blocks, self.key, self.window_blocks = reader, blocks, list(key), window_blocks
    self.epoch_posts = int(reader.sizes[blocks].sum())
    self.rows, self.pos, self.at = None, 0, (0, 0)   # the window (epoch, index) in rows

  def _order(self, epoch: int) -> np.ndarray:
    return self.blocks[np.random.default_rng(self.key + [epoch, 0]).permutation(len(self.blocks))]

  def seek(self, consumed: int) -> None:
    """Positions the stream after its first `consumed` posts."""
    epoch, offset = divmod(consumed, self.epoch_posts)
    starts = np.r_[0, np.cumsum(self.reader.sizes[self._order(epoch)])][:-1:self.window_blocks]
    window = int(np.searchsorted(starts, offset, side="right")) - 1
    self._load(epoch, window)
    self.pos = offset - int(starts[window])

  def _load(self, epoch: int, window: int) -> None:
    order = self._order(epoch)
    if window * self.window_blocks >= len(order):
      epoch, window, order = epoch + 1, 0, self._order(epoch + 1)
    chosen = order[window * self.window_blocks:(window + 1) * self.window_blocks]
    rows = np.concatenate([_ints(self.reader.rows(j)) for j in chosen])
    shuffle = np.random.default_rng(self.key + [epoch, 1, window]).permutation(len(rows))
    self.rows, self.pos, self.at = np.take(rows, shuffle, axis=0), 0, (epoch, window)

  def take(self, n: int) -> list[np.ndarray]:
    """The next n posts, as slices of windows."""
    out = []
    while n:
      if self.pos == len(self.rows):
        self._load(self.at[0], self.at[1] + 1)
      k = min(n, len(self.rows) - self.pos)
      out.append(self.rows[self.pos:self.pos + k])
      self.pos, n = self.pos + k, n - k
    return out


class _StreamIterator(grain.DatasetIterator):
  """This process's part of each global batch; state {"posts", "streams"}."""

  def __init__(self, streams: list[_Stream], share: int, num_streams: int):
    super().__init__()
    self.streams, self.share, self.num_streams = streams, share, num_streams
    self.consumed, self._placed = 0, False

  def __next__(self) -> dict:
    if not self._placed:
      for stream in self.streams:
        stream.seek(self.consumed)
      self._placed = True
    pieces = [p for stream in self.streams for p in stream.take(self.share)]
    self.consumed += self.share
    return {"posts": pieces[0] if len(pieces) == 1 else np.concatenate(pieces)}

  def get_state(self) -> dict:
    return {"posts": self.consumed, "streams": self.num_streams}

  def set_state(self, state: Mapping) -> None:
    if state["streams"] != self.num_streams:
      raise ValueError(f"the checkpoint's data position is for {state['streams']} streams, "
                       f"this run reads {self.num_streams} (config.data.streams)")
    self.consumed, self._placed = int(state["posts"]), False


class PostStreams(grain.IterDataset):
  """The train split as this process's streams (see the module)."""

  def __init__(self, reader: records.SplitReader, *, batch_size: int, seed: int,
               process_index: int, process_count: int, streams: int, window_posts: int):
    super().__init__()
    self.reader, self.batch_size, self.num_streams = reader, batch_size, streams
    per_process = streams // process_count
    global_batch = batch_size * process_count
    if streams % process_count or global_batch % streams:
      raise ValueError(f"{streams} data streams cannot be split evenly over {process_count} "
                       f"processes and a global batch of {global_batch}: set "
                       "config.data.streams to a divisor of the batch and a multiple of "
                       "the processes")
    if reader.num_blocks < streams:
      raise ValueError(f"the train split has {reader.num_blocks} blocks, fewer than the "
                       f"{streams} data streams: prepare it with a smaller --block_posts")
    self.share = global_batch // streams
    window_blocks = max(1, window_posts // int(reader.sizes[0]))
    mine = range(process_index * per_process, (process_index + 1) * per_process)
    self.stream_args = [(np.arange(k, reader.num_blocks, streams), (seed, k), window_blocks)
                        for k in mine]
    smallest = min(int(reader.sizes[b].sum()) for b, _, _ in self.stream_args)
    if smallest < self.share:
      raise ValueError(f"a data stream holds {smallest} train posts, fewer than its "
                       f"{self.share} posts of each batch")

  def __iter__(self) -> _StreamIterator:
    return _StreamIterator([_Stream(self.reader, *a) for a in self.stream_args], self.share,
                           self.num_streams)


def train_dataset(data_dir: str, metadata: Mapping, *, batch_size: int, seed: int,
                  process_index: int = 0, process_count: int = 1, streams: int = 0,
                  window_posts: int = WINDOW_POSTS) -> PostStreams:
  """Endless shuffled batches {"posts": int32 [batch_size, ROW_INTS]} of the
  train split for this process (streams=0: one stream per process)."""
  return PostStreams(split_reader(data_dir, metadata, "train"), batch_size=batch_size,
                     seed=seed, process_index=process_index, process_count=process_count,
                     streams=streams or process_count, window_posts=window_posts)


# -------------------------------------------------------------- evaluation --

def eval_batches(data_dir: str, metadata: Mapping, split: str, batch_size: int,
                 image_input: str | None) -> Iterator[dict[str, np.ndarray]]:
  """All posts of a split in order, as batches {post_id (bytes), user, image_id,
  image_mask, text_hash (int64), timestamp, tokens, text_mask}.

  Image features are gathered whenever the data has them (the oracle reads
  them), pixels when image_input == "pixels" and the data has them;
  image_input=None gathers neither (a fast pass over ids, users and tokens).
  """
  reader = split_reader(data_dir, metadata, split)
  keys = (["image_features"] if image_input else []) + (
      ["image"] if image_input == "pixels" and metadata.get("image_size") else [])
  tables = {k: records.read_table(data_dir, metadata, k) for k in keys}
  try:
    blocks = (reader.block(j) for j in range(reader.num_blocks))
    for rows, ids in records.rechunk(blocks, batch_size):
      yield _eval_batch(rows, ids, tables)
  finally:
    reader.close()


def _eval_batch(rows: np.ndarray, ids: list[bytes], tables: Mapping) -> dict:
  batch = model_inputs(_ints(rows), host_gather(tables))
  post_id = np.empty(len(ids), object)
  post_id[:] = ids
  return batch | {"post_id": post_id, "text_hash": rows["text_hash"],
                  "image_id": rows["image_id"].astype(np.int64), "timestamp": rows["timestamp"]}
