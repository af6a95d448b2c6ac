"""How do shards become batches for this process, resumably?

Training: grain over this process's shards (shard i goes to process
i % process_count): a seeded global shuffle of their records (reshuffled each
epoch), parsing, and batching to the per-process batch. The iterator's state is
a small JSON-able dict that is saved with every checkpoint.
Evaluation: the records of a split in file order, in fixed-size batches.
"""

import os
from collections.abc import Iterator, Mapping

import grain
import numpy as np

from input_pipeline import records

# Fields the model step needs; everything else stays on the host.
MODEL_FIELDS = ("user", "tokens", "text_mask", "text_hash", "image_mask", "image_id")


def fold_hash(h: np.ndarray) -> np.ndarray:
  """int64 hashes -> int32 (XOR of the halves): JAX runs without 64-bit ints."""
  h = np.asarray(h, np.int64)
  return (h ^ (h >> 32)).astype(np.int32)


def model_inputs(example: Mapping[str, np.ndarray], image_key: str) -> dict:
  """Parsed example (or batch) -> the numeric arrays the train step reads."""
  out = {k: example[k] for k in MODEL_FIELDS}
  out["text_hash"] = fold_hash(example["text_hash"])
  out["image_id"] = np.asarray(example["image_id"]).astype(np.int32)
  out[image_key] = example[image_key]
  return out


def split_paths(data_dir: str, metadata: Mapping, split: str) -> list[str]:
  if split not in metadata["splits"]:
    raise ValueError(f"split {split!r} not in {data_dir} "
                     f"(has {sorted(metadata['splits'])})")
  return [os.path.join(data_dir, s) for s in metadata["splits"][split]["shards"]]


def make_parser(metadata: Mapping, image_input: str) -> records.Parser:
  if image_input == "features":
    return records.Parser(feature_dim=metadata["feature_dim"])
  if not metadata.get("image_size"):
    raise ValueError("model.image_input='pixels' needs a dataset with encoded "
                     "images (metadata image_size > 0)")
  return records.Parser(image_size=metadata["image_size"])


def train_dataset(data_dir: str, metadata: Mapping, *, batch_size: int,
                  image_input: str, image_key: str, seed: int,
                  process_index: int = 0, process_count: int = 1,
                  num_threads: int = 2) -> grain.IterDataset:
  """Endless shuffled per-process batches of the train split (numpy dicts)."""
  paths = split_paths(data_dir, metadata, "train")[process_index::process_count]
  if not paths:
    raise ValueError(f"{process_count} processes but only "
                     f"{len(metadata['splits']['train']['shards'])} train shards")
  source = records.ShardReader(paths)
  if len(source) < batch_size:
    raise ValueError(f"process {process_index} has {len(source)} train records, "
                     f"fewer than its batch of {batch_size}")
  parser = make_parser(metadata, image_input)
  to_batch = lambda payloads: model_inputs(parser.batch(payloads), image_key)
  ds = (grain.MapDataset.source(source)
        .shuffle(seed=seed)
        .repeat(None)
        .batch(batch_size, drop_remainder=True, batch_fn=to_batch))
  options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=4)
  return ds.to_iter_dataset(options)


def train_iterator(*args, **kwargs) -> grain.DatasetIterator:
  """An iterator of `train_dataset(*args, **kwargs)`."""
  return iter(train_dataset(*args, **kwargs))


def eval_batches(data_dir: str, metadata: Mapping, split: str, batch_size: int,
                 image_input: str | None) -> Iterator[dict[str, np.ndarray]]:
  """All records of a split in file order, as batches of parsed examples.

  Image features are parsed whenever the data has them (the oracle reads
  them), pixels when image_input == "pixels"; image_input=None parses neither
  (a fast pass over ids, users and tokens).
  """
  source = records.ShardReader(split_paths(data_dir, metadata, split))
  parser = records.Parser(
      feature_dim=metadata.get("feature_dim", 0) if image_input else None,
      image_size=metadata.get("image_size", 0) if image_input == "pixels" else 0)
  ds = grain.MapDataset.source(source).batch(batch_size, batch_fn=parser.batch)
  try:
    yield from ds.to_iter_dataset(grain.ReadOptions(num_threads=2))
  finally:
    source.close()
