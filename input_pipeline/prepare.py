"""How does a user's raw crawl (JSONL + images + interactions) become training shards?

Two streaming passes over the posts, spread over processes (chunks of lines):
  1. parse each line, clean its text, resolve/decode/hash its image, and keep
     only small per-post metadata (ids, word ids, image index) in NumPy arrays;
  2. (after deduplication, grouping, splitting and the vocabulary) write the
     image tables, row = image id (features from `image_features`, pixels
     re-read from disk into a memory-mapped file), then the records of each
     split in blocks of `block_posts` posts (records.py).
Nothing holds all images or decoded pixels in memory: an image is decoded
once per worker while it stays in a small cache. An image file that is absent but has
a vector in `image_features` (a crawl of features only) is an image without
pixels, identified by its name.

Bad input is reported, never fatal: each problem has a named reason counted in
`prepare_report.json` with example line numbers; the post is skipped, or only
its broken part (image or text) is dropped. With `strict`, the first bad
record stops the job (PrepareError names the line). A crawl that cannot give
a dataset at all (no post kept, no word reaching `min_count`, a missing file)
is a PrepareError whose one line says which flag to look at; a held-out split
too small to measure is a warning.

Splits: groups of posts linked by a shared image or a near-duplicate text
(`dedup`) never straddle splits; groups with images are split first, then
text-only groups. Only groups where at least `min_held_out_known` of the
posts have an author who also posts in another group can be held out (the
others stay in training); held-out posts whose author then has no training
post are dropped (both counted), so every user of validation and test exists
in train. `held_out_authors="any"` lifts that rule (corpora where almost every
author posts once); the report then counts held-out posts of unseen authors.

New data for a trained model: with `vocab_from` (a prepared dataset) the
vocabulary is that dataset's (not rebuilt from this crawl), its users keep their
indices (users new to it are appended after them and counted in the report;
metadata `num_known_users`, `vocab_from`) and its word vectors are copied into
word2vec_init.npz (not retrained): its words, its users' initial rows, and for
the new users the mean vector of their training words (word2vec.user_means,
the same rule). Its users count as having a training post for the author rule.
`split_field` names a field whose value (train, validation or test) is the
post's split, taken as given (no grouping, nothing dropped; other values are
`bad_split`).

Interests: with `interest_field`, a user's interest labels are the values of
that field over all their kept posts (every split), one line per user index
in `interests.txt` (for sempre_jax.evals.interests).

Interactions (for the recommendation models): `actions` (JSONL: user_id,
post_id, optional timestamp and kind, e.g. "like") and `follows` (JSONL:
user_id, followee_id) are written as `graph.npz` (input_pipeline/interactions.py):
follows [E, 2] (user, followee), actions [A, 3] (user, post row, unix time),
action_kinds [A] ("" when not given) and post_ids [N] (post row -> post id;
every written post, in the order of the posts file). An action without a
timestamp happened when its post was published. Users who act or follow but
have no kept post are appended to the user index after the users with posts
(metadata `users_with_posts`), so the family models rank posts for them too.
Lines are skipped and counted when bad (as posts), when the post id is not a
valid post (`unknown_post_id`) or a valid post prepare did not write
(`post_not_written`), or repeat a (user, post) action or a follow edge
(kept once). Actions on held-out posts are kept: the family splits each
user's actions by time.

Planted truth: `oracle` (a truth file, input_pipeline/oracle.py) is copied
into the dataset as `oracle.npz`; `oracle.load` reads it in the dataset's ids.

Determinism: the same crawl and options give byte-identical outputs (apart
from the timing in the report), whatever the number of workers.
"""

import collections
import dataclasses
import datetime
import functools
import json
import os
import shutil
import time
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent import futures

import numpy as np

from input_pipeline import dedup, images, oracle, progress, records, splits, text, word2vec

REPORT_FILE = "prepare_report.json"
FEATURES_FILE = "image_features.npz"   # written with image_encoder
EXAMPLES = 5
MIN_HELD_OUT = 50   # fewer held-out posts or images than this: a warning
# Problems that drop a post or part of it (fatal with --strict); the others are notes:
# non_rgb_image, empty_text_after_cleaning, nothing_left_after_cleaning, bad_timestamp.
ERRORS = ("invalid_utf8", "malformed_json", "missing_post_id", "missing_user_id",
          "bad_split", "no_text_no_image", "duplicate_post_id", "corrupt_image",
          "truncated_image", "image_too_large", "image_outside_corpus", "image_missing",
          "image_features_missing")
# Problems of the actions and follows files that skip a line (fatal with --strict); the
# notes duplicate_action and duplicate_follow skip a repeat.
INTERACTION_ERRORS = ("invalid_utf8", "malformed_json", "missing_user_id", "missing_post_id",
                      "missing_followee_id", "unknown_post_id", "post_not_written",
                      "bad_timestamp", "self_follow")


class PrepareError(ValueError):
  """A crawl that cannot be prepared, or a bad record under `strict`: one line
  that says why (and which flag to look at)."""


@dataclasses.dataclass(frozen=True)
class Options:
  id_field: str = "post_id"
  user_field: str = "user_id"
  text_fields: tuple = ("text",)
  image_field: str = "image"
  timestamp_field: str = "timestamp"
  interest_field: str | None = None   # a user's interests: this field's values over their posts
  image_root: str | None = None       # default: the folder of the posts file
  image_size: int = 64
  image_features: str | None = None   # .npz: image path (as in the posts) or id -> vector
  image_encoder: str = "none"         # efficientnet_lite0 | resnet152:PATH | none (cnn/features.py)
  actions: str | None = None          # JSONL: user_id, post_id[, timestamp, kind]
  follows: str | None = None          # JSONL: user_id, followee_id
  oracle: str | None = None           # the planted truth (oracle.py), copied as oracle.npz
  vocab_from: str | None = None       # a prepared dataset: its vocabulary, users, word vectors
  split_field: str | None = None      # a field naming each post's split (no random split)
  max_image_pixels: int = images.MAX_PIXELS
  test_fraction: float = 0.2
  validation_fraction: float = 0.02
  held_out_authors: str = "in_train"  # or "any": no author rule (counted in the report)
  split_by: str = "groups"            # fractions of groups, or "size": of the images
                                      # (image groups) and posts (text-only groups)
  min_held_out_known: float = 0.5   # held-out groups: min. share of posts whose
                                    # author posts in another group (else train)
  min_count: int = 5
  near_dup_threshold: float = 0.8
  num_shards: int = 4
  block_posts: int = records.BLOCK_POSTS   # posts per record
  word2vec_dim: int = 300             # 0: no word2vec initialisation
  word2vec_epochs: int = 5
  seed: int = 0
  strict: bool = False
  workers: int = 0                    # 0: every core
  chunk_lines: int = 2000


@dataclasses.dataclass(frozen=True)
class BadRecord:
  reason: str
  line: int
  post_id: str | None = None
  detail: str = ""


# ------------------------------------------------------ per-record transforms --

def parse_timestamp(value) -> int | None:
  """Unix seconds, a Twitter date ('Wed Apr 17 18:57:37 +0000 2013') or ISO 8601."""
  if isinstance(value, (int, float)) and not isinstance(value, bool):
    return int(value)
  if isinstance(value, str):
    for parse in (lambda v: datetime.datetime.strptime(v, "%a %b %d %H:%M:%S %z %Y"),
                  datetime.datetime.fromisoformat):
      try:
        t = parse(value.strip())
        return int((t if t.tzinfo else t.replace(tzinfo=datetime.UTC)).timestamp())
      except ValueError:
        pass
    if value.strip().isdigit():
      return int(value)
  return None


def json_object(line: bytes, line_no: int) -> dict | BadRecord:
  """One JSONL line -> its JSON object, or BadRecord (invalid_utf8, malformed_json)."""
  try:
    decoded = line.decode("utf-8")
  except UnicodeDecodeError as e:
    return BadRecord("invalid_utf8", line_no, detail=str(e))
  try:
    obj = json.loads(decoded)
  except json.JSONDecodeError as e:
    return BadRecord("malformed_json", line_no, detail=str(e))
  if not isinstance(obj, dict):
    return BadRecord("malformed_json", line_no, detail="not a JSON object")
  return obj


def parse_line(line: bytes, line_no: int, options: Options) -> dict | BadRecord:
  """One JSONL line -> {post_id, user_id, text, image, timestamp, interest, split} or
  BadRecord."""
  post = json_object(line, line_no)
  if isinstance(post, BadRecord):
    return post
  post_id = _field(post, options.id_field)
  if post_id is None:
    return BadRecord("missing_post_id", line_no)
  user = _field(post, options.user_field)
  if user is None:
    return BadRecord("missing_user_id", line_no, post_id)
  split = _field(post, options.split_field) if options.split_field else None
  if options.split_field and split not in records.SPLITS:
    return BadRecord("bad_split", line_no, post_id, str(post.get(options.split_field)))
  raw_text = " ".join(str(post[f]) for f in options.text_fields if post.get(f))
  image = _field(post, options.image_field)
  if not raw_text.strip() and image is None:
    return BadRecord("no_text_no_image", line_no, post_id)
  stamp = post.get(options.timestamp_field)   # absent: 0; unreadable: None (noted)
  interest = _field(post, options.interest_field) if options.interest_field else None
  return dict(post_id=post_id, user_id=user, text=raw_text, image=image,
              timestamp=0 if stamp is None else parse_timestamp(stamp), split=split,
              interest=interest and " ".join(interest.split()))   # no tabs or newlines


def _field(post: dict, name: str) -> str | None:
  value = post.get(name)
  if value is None or isinstance(value, (dict, list)) or str(value).strip() == "":
    return None
  return str(value)


@functools.lru_cache(maxsize=1024)
def _cached_image(path: str, size: int, max_pixels: int) -> images.LoadedImage | str:
  try:
    return images.load_image(path, size, max_pixels)
  except images.ImageError as e:
    return e.reason


def process_post(post: dict, line_no: int, options: Options, root: str):
  """A parsed post -> (kept fields or None, [BadRecord]): cleaning and image checks."""
  issues = []
  bad = lambda reason, detail="": issues.append(
      BadRecord(reason, line_no, post["post_id"], detail))
  words = text.clean_text(post["text"])
  if post["text"].strip() and not words:
    bad("empty_text_after_cleaning")
  if post["timestamp"] is None:
    bad("bad_timestamp")
  path, pixel_hash = None, None
  if post["image"] is not None:
    try:
      path = images.resolve(root, post["image"])
      loaded = _cached_image(path, options.image_size, options.max_image_pixels)
      if isinstance(loaded, str):
        raise images.ImageError(loaded)
      pixel_hash = loaded.pixel_hash
      if loaded.mode != "RGB":
        bad("non_rgb_image", loaded.mode)
    except images.ImageError as e:
      key = (e.reason == "image_missing" and options.image_features
             and _feature_key(_feature_keys(options.image_features), post["image"]))
      if key:     # no file, but a vector: an image of features only
        pixel_hash = b"features:" + key.encode()
      else:
        bad(e.reason, post["image"])
      path = None
  if not words and pixel_hash is None:
    bad("nothing_left_after_cleaning")
    return None, issues
  return dict(words=words, image_path=path, image_key=post["image"],
              pixel_hash=pixel_hash, post_id=post["post_id"], user_id=post["user_id"],
              timestamp=post["timestamp"] or 0, interest=post["interest"],
              split=post["split"], line=line_no), issues


# --------------------------------------------------------------- pass 1 ------

def _pass1_chunk(args) -> dict:
  """A chunk of lines -> compact columns of its kept posts and its issues."""
  first_line, lines, options, root = args
  issues, kept = [], []
  for i, line in enumerate(lines):
    if not line.strip():
      continue
    post = parse_line(line, first_line + i, options)
    if isinstance(post, BadRecord):
      issues.append(post)
      continue
    fields, notes = process_post(post, first_line + i, options, root)
    issues += notes
    if fields is not None:
      kept.append(fields)
  local = {}
  ids = [local.setdefault(w, len(local)) for p in kept for w in p["words"]]
  return dict(
      issues=issues, lines=sum(1 for line in lines if line.strip()),
      words=list(local), word_ids=np.asarray(ids, np.int32),
      lengths=np.asarray([len(p["words"]) for p in kept], np.int32),
      **{k: [p[k] for p in kept] for k in (
          "post_id", "user_id", "timestamp", "line", "image_path", "image_key",
          "pixel_hash", "interest", "split")})


def _line_chunks(path: str, chunk_lines: int, options: Options, root: str):
  with open(path, "rb") as f:
    lines, first = [], 1
    for line in f:
      lines.append(line)
      if len(lines) == chunk_lines:
        yield (first, lines, options, root), f.tell()
        first, lines = first + len(lines), []
    if lines:
      yield (first, lines, options, root), f.tell()


def ordered_map(pool: futures.Executor, fn: Callable, items: Iterable,
                inflight: int) -> Iterator:
  """pool.map with at most `inflight` tasks queued (bounded memory), in order.

  items yields (args, progress) pairs; yields (result, progress).
  """
  queue = collections.deque()
  for args, progress in items:
    queue.append((pool.submit(fn, args), progress))
    if len(queue) >= inflight:
      fut, prog = queue.popleft()
      yield fut.result(), prog
  while queue:
    fut, prog = queue.popleft()
    yield fut.result(), prog


@dataclasses.dataclass
class _Issues:
  """Counts and example locations per reason, of one input file."""
  source: str                    # the file, as named in a --strict error
  errors: tuple = ERRORS         # the reasons --strict stops at
  counts: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  examples: dict = dataclasses.field(default_factory=lambda: collections.defaultdict(list))

  def add(self, issue: BadRecord, strict: bool) -> None:
    if strict and issue.reason in self.errors:
      raise PrepareError(f"{self.source}: line {issue.line}: {issue.reason}"
                         + (f" (post {issue.post_id})" if issue.post_id else "")
                         + (f": {issue.detail}" if issue.detail else "") + " (--strict)")
    self.counts[issue.reason] += 1
    if len(self.examples[issue.reason]) < EXAMPLES:
      self.examples[issue.reason].append(
          f"line {issue.line}" + (f" (post {issue.post_id})" if issue.post_id else ""))

  def report(self) -> dict:
    return {r: {"count": c, "examples": self.examples[r]}
            for r, c in sorted(self.counts.items())}


def scan(posts_path: str, options: Options, root: str, pool: futures.Executor,
         issues: _Issues) -> dict:
  """Pass 1: every kept post's compact columns (word ids index `words`, interest
  ids `interest_labels`, -1 = none)."""
  size = max(os.path.getsize(posts_path), 1)
  word_index, user_index, image_index, interest_index = {}, {}, {}, {}
  image_paths, image_keys, seen_ids = [], [], set()
  cols = collections.defaultdict(list)
  bar, n_posts, n_lines = progress.bar(size, "pass 1 (clean, hash images)", "B",
                                       delay=2), 0, 0
  chunks = _line_chunks(posts_path, options.chunk_lines, options, root)
  for res, offset in ordered_map(pool, _pass1_chunk, chunks, 2 * pool._max_workers):
    n_lines += res["lines"]
    for issue in sorted(res["issues"], key=lambda b: b.line):
      issues.add(issue, options.strict)
    local_to_global = np.asarray(
        [word_index.setdefault(w, len(word_index)) for w in res["words"]], np.int32)
    keep = np.ones(len(res["post_id"]), bool)
    for i, pid in enumerate(res["post_id"]):
      if pid in seen_ids:
        keep[i] = False
        issues.add(BadRecord("duplicate_post_id", res["line"][i], pid), options.strict)
      seen_ids.add(pid)
    word_keep = np.repeat(keep, res["lengths"])
    cols["word_ids"].append(local_to_global[res["word_ids"]][word_keep]
                            if len(res["word_ids"]) else res["word_ids"])
    cols["lengths"].append(res["lengths"][keep])
    for i in np.flatnonzero(keep):
      h = res["pixel_hash"][i]
      if h is not None and h not in image_index:
        image_index[h] = len(image_paths)
        image_paths.append(res["image_path"][i])
        image_keys.append(res["image_key"][i])
      cols["image"].append(-1 if h is None else image_index[h])
      cols["user"].append(user_index.setdefault(res["user_id"][i], len(user_index)))
      cols["post_id"].append(res["post_id"][i])
      cols["timestamp"].append(res["timestamp"][i])
      cols["line"].append(res["line"][i])
      cols["split"].append(res["split"][i] or "")
      interest = res["interest"][i]
      cols["interest"].append(-1 if interest is None else
                              interest_index.setdefault(interest, len(interest_index)))
    n_posts += int(keep.sum())
    bar.update(offset - bar.n)
    bar.set_postfix_str(f"{n_posts} posts", refresh=False)
  bar.close()
  lengths = np.concatenate(cols["lengths"]) if cols["lengths"] else np.zeros(0, np.int32)
  return dict(
      words=list(word_index), image_paths=image_paths, image_keys=image_keys,
      word_ids=(np.concatenate(cols["word_ids"]) if cols["word_ids"]
                else np.zeros(0, np.int32)),
      indptr=np.r_[0, np.cumsum(lengths, dtype=np.int64)],
      image=np.asarray(cols["image"], np.int64), user=np.asarray(cols["user"], np.int64),
      post_id=cols["post_id"], timestamp=np.asarray(cols["timestamp"], np.int64),
      line=np.asarray(cols["line"], np.int64), num_users_seen=len(user_index),
      users=list(user_index), interest=np.asarray(cols["interest"], np.int64),
      split=np.asarray(cols["split"], object),
      interest_labels=list(interest_index), lines=n_lines)


# ------------------------------------------------------------- features ------

def encode_images(keys: Sequence[str], paths: Sequence[str | None], encoder: str,
                  out_dir: str) -> str:
  """The pooled features of a frozen pretrained CNN (`encoder`, see
  input_pipeline/cnn/features.py) for the images found by pass 1, written as
  out_dir/image_features.npz (key: the image as the posts name it); its path."""
  from input_pipeline.cnn import features   # JAX and Flax only when asked for
  out = os.path.join(out_dir, FEATURES_FILE)
  os.makedirs(out_dir, exist_ok=True)
  features.extract_features({k: p for k, p in zip(keys, paths) if p is not None}, encoder,
                            out)
  return out


def _feature_key(keys: Sequence[str], key: str) -> str | None:
  """The .npz key of an image: its path as given, its file name, or its stem."""
  for k in (key, os.path.basename(key), os.path.splitext(os.path.basename(key))[0]):
    if k in keys:
      return k
  return None


@functools.lru_cache(maxsize=2)
def _features_file(path: str):
  return np.load(path, allow_pickle=False)


@functools.lru_cache(maxsize=2)
def _feature_keys(path: str) -> frozenset:
  return frozenset(_features_file(path).files)


# --------------------------------------------------------------- interests ---

def user_interests(user: np.ndarray, interest: np.ndarray, labels: Sequence[str],
                   num_users: int) -> list[list[str]]:
  """Each user's sorted interest labels: the values over their posts.

  user, interest: [N] per post (interest indexes `labels`, -1 = none).
  """
  out = [[] for _ in range(num_users)]
  for u, i in np.unique(np.stack([user, interest], 1)[interest >= 0], axis=0):
    out[u].append(labels[i])
  return [sorted(x) for x in out]


# ------------------------------------------------------------------ splits ---

def assign_splits(groups: np.ndarray, image: np.ndarray, user: np.ndarray,
                  options: Options, known: np.ndarray | None = None,
                  given: np.ndarray | None = None) -> tuple[np.ndarray, dict]:
  """[N] split name per post ("" = dropped: its user has no training post).

  known: [N] bool, the post's author is in the --vocab_from dataset (counts as
  having a training post); given: [N] split names from --split_field, used as
  they are (nothing dropped).
  """
  n = len(groups)
  _, groups = np.unique(groups, return_inverse=True)
  num_groups = int(groups.max(initial=-1)) + 1
  user_groups = np.unique(np.stack([user, groups], 1), axis=0)[:, 0] if n else user
  posts_elsewhere = np.bincount(user_groups, minlength=int(user.max(initial=-1)) + 1)[user] > 1
  size = np.bincount(groups, minlength=num_groups)
  eligible = np.bincount(groups, weights=posts_elsewhere, minlength=num_groups) \
      >= np.maximum(options.min_held_out_known * size, 1e-9)
  if options.held_out_authors == "any":
    eligible[:] = True
  elif options.held_out_authors != "in_train":
    raise ValueError(f"held_out_authors must be 'in_train' or 'any', "
                     f"got {options.held_out_authors!r}")
  with_image = np.bincount(groups, weights=image >= 0, minlength=num_groups) > 0
  fractions = {"test": options.test_fraction, "validation": options.validation_fraction}
  assignment = np.full(n, "train", dtype=object)
  if options.split_by not in ("groups", "size"):
    raise ValueError(f"split_by must be 'groups' or 'size', got {options.split_by!r}")
  if given is not None:
    assignment[:] = given
  uniq, first = np.unique(image, return_index=True)
  first_of_image = np.zeros(n, bool)   # the size of an image group: its distinct images
  first_of_image[first[uniq >= 0]] = True
  for k, has_image in enumerate((True, False) if given is None else ()):   # images first
    sel = eligible[groups] & (with_image[groups] == has_image)
    sizes = None if options.split_by == "groups" else (
        first_of_image[sel] if has_image else np.ones(int(sel.sum())))
    if sel.any():
      assignment[sel] = splits.split_by_group(groups[sel], fractions, options.seed + k,
                                              sizes)
  in_train = np.zeros(int(user.max(initial=-1)) + 1, bool)
  in_train[user[(assignment == "train") | (False if known is None else known)]] = True
  dropped = ((assignment != "train") & ~in_train[user] & (options.held_out_authors != "any")
             & (given is None))
  stats = {"split_field": options.split_field, "split_by": options.split_by,
           "groups": num_groups, "groups_with_images": int(with_image.sum()),
           "groups_kept_in_train_authors_post_nowhere_else": int((~eligible).sum()),
           "posts_in_those_groups": int(size[~eligible].sum()),
           "held_out_authors": options.held_out_authors,
           "held_out_posts_dropped_author_not_in_train": {
               s: int((dropped & (assignment == s)).sum()) for s in fractions},
           "held_out_posts_author_not_in_train_kept": {
               s: int((~dropped & ~in_train[user] & (assignment == s)).sum())
               for s in fractions}}
  assignment[dropped] = ""
  return assignment, stats


# ---------------------------------------------------------------- pass 2 -----

def _pixels_chunk(args) -> np.ndarray:
  """Image paths (None: an image of features only) -> uint8 [n, S, S, 3] (zeros
  for None), re-read from disk."""
  paths, options = args
  out = np.zeros([len(paths), options.image_size, options.image_size, 3], np.uint8)
  for i, path in enumerate(paths):
    if path is not None:
      out[i] = _cached_image(path, options.image_size, options.max_image_pixels).pixels
  return out


class _Sentences:
  """Restartable iterable of the training texts as lists of vocabulary words."""

  def __init__(self, vocab, token_lists):
    self.vocab, self.token_lists = vocab, token_lists

  def __iter__(self):
    for ids in self.token_lists():
      yield [self.vocab[i] for i in ids if i > records.UNK_ID]


class _InlineExecutor(futures.Executor):
  """Runs tasks in this process (workers=1: no process start-up)."""
  _max_workers = 1

  def submit(self, fn, *args, **kwargs):
    fut = futures.Future()
    fut.set_result(fn(*args, **kwargs))
    return fut


def _count_lines(path: str) -> int:
  with open(path, "rb") as f:
    return sum(block.count(b"\n") for block in iter(lambda: f.read(1 << 20), b""))


def _executor(workers: int) -> futures.Executor:
  if workers == 1:
    return _InlineExecutor()
  import multiprocessing
  return futures.ProcessPoolExecutor(
      workers, mp_context=multiprocessing.get_context("forkserver"))


# ------------------------------------------------------------ interactions ---

def _json_lines(path: str) -> Iterator[tuple[int, dict | BadRecord]]:
  """(line number, JSON object or BadRecord) of each non-empty line of a JSONL file."""
  with open(path, "rb") as f:
    for line_no, line in enumerate(f, 1):
      if line.strip():
        yield line_no, json_object(line, line_no)


def read_actions(path: str, options: Options, post_row: Mapping[str, int],
                 valid_posts: set, post_time: np.ndarray, users: dict,
                 issues: _Issues) -> tuple[np.ndarray, list[str]]:
  """The actions file -> ([A, 3] (user index, post row, unix time), kinds [A]).

  post_row: post id -> row of the written posts; valid_posts: every valid post
  id (also those not written); post_time [N]: unix time of each row; users:
  user id -> index, extended with the new users of valid lines.
  """
  out, kinds, seen = [], [], set()
  for line_no, obj in _json_lines(path):
    if isinstance(obj, BadRecord):
      issues.add(obj, options.strict)
      continue
    user, pid = _field(obj, "user_id"), _field(obj, "post_id")
    row = post_row.get(pid)
    stamp = obj.get("timestamp")
    t = None if row is None else int(post_time[row]) if stamp is None else parse_timestamp(stamp)
    reason = ("missing_user_id" if user is None else "missing_post_id" if pid is None
              else "post_not_written" if row is None and pid in valid_posts
              else "unknown_post_id" if row is None else "bad_timestamp" if t is None
              else "duplicate_action" if (user, row) in seen else None)
    if reason:
      issues.add(BadRecord(reason, line_no, pid, str(stamp) if reason == "bad_timestamp"
                           else ""), options.strict)
      continue
    seen.add((user, row))
    out.append((users.setdefault(user, len(users)), row, t))
    kinds.append(_field(obj, "kind") or "")
  return np.asarray(out, np.int64).reshape(-1, 3), kinds


def read_follows(path: str, options: Options, users: dict, issues: _Issues) -> np.ndarray:
  """The follows file -> [E, 2] (user index, followee index); users: as read_actions."""
  out, seen = [], set()
  for line_no, obj in _json_lines(path):
    if isinstance(obj, BadRecord):
      issues.add(obj, options.strict)
      continue
    user, followee = _field(obj, "user_id"), _field(obj, "followee_id")
    reason = ("missing_user_id" if user is None else "missing_followee_id" if followee is None
              else "self_follow" if user == followee
              else "duplicate_follow" if (user, followee) in seen else None)
    if reason:
      issues.add(BadRecord(reason, line_no, detail=f"{user} -> {followee}"), options.strict)
      continue
    seen.add((user, followee))
    out.append((users.setdefault(user, len(users)), users.setdefault(followee, len(users))))
  return np.asarray(out, np.int64).reshape(-1, 2)


def _interaction_report(path: str, lines_written: int, issues: _Issues) -> dict:
  return dict(file=os.path.abspath(path), written=lines_written, problems=issues.report())


# --------------------------------------------------------------- vocab_from --

@dataclasses.dataclass(frozen=True)
class Reference:
  """What a crawl prepared with --vocab_from takes from that dataset."""
  path: str
  vocab: list[str]              # token id -> word
  users: dict[str, int]         # user id -> index (kept by this crawl)
  words: np.ndarray | None      # [V, dim] word vectors (word2vec_init.npz), or None
  user_rows: np.ndarray | None  # [U, dim] its users' initial rows


def read_reference(path: str) -> Reference:
  """The vocabulary, users and word vectors of a prepared dataset (PrepareError
  when it has none)."""
  vocab = records.read_lines(path, records.VOCAB_FILE)
  users = records.read_lines(path, records.USERS_FILE)
  if vocab is None or users is None:
    raise PrepareError(f"--vocab_from: {path} is not a prepared dataset (no "
                       f"{records.VOCAB_FILE} and {records.USERS_FILE})")
  words = rows = None
  if os.path.exists(os.path.join(path, word2vec.INIT_FILE)):
    with np.load(os.path.join(path, word2vec.INIT_FILE)) as z:
      words, rows = z["words"], z["users"]
  return Reference(os.path.abspath(path), vocab, {u: i for i, u in enumerate(users)},
                   words, rows)


# ------------------------------------------------------------------ checks -----

def check_inputs(posts_path: str, options: Options) -> None:
  """PrepareError (one line, naming the flag) for inputs that cannot work."""
  for flag, path in (("posts", posts_path), ("actions", options.actions),
                     ("follows", options.follows), ("image_features", options.image_features),
                     ("oracle", options.oracle)):
    if path is not None and not os.path.isfile(path):
      raise PrepareError(f"--{flag}: {path} is not a file")
  if os.path.getsize(posts_path) == 0:
    raise PrepareError(f"--posts: {posts_path} is empty")
  held_out = options.test_fraction + options.validation_fraction
  if min(options.test_fraction, options.validation_fraction) < 0 or held_out >= 1:
    raise PrepareError(f"--test_fraction={options.test_fraction} and --validation_fraction="
                       f"{options.validation_fraction} must be >= 0 and sum to less than 1")
  if options.split_by not in ("groups", "size"):
    raise PrepareError(f"--split_by must be groups or size, got {options.split_by!r}")
  if options.held_out_authors not in ("in_train", "any"):
    raise PrepareError(f"--held_out_authors must be in_train or any, "
                       f"got {options.held_out_authors!r}")
  if min(options.num_shards, options.min_count, options.block_posts) < 1 \
      or options.word2vec_dim < 0:
    raise PrepareError("--num_shards, --min_count and --block_posts must be >= 1, "
                       "--word2vec_dim >= 0")
  if options.image_encoder != "none":
    from input_pipeline.cnn import features   # JAX and Flax only when asked for
    try:
      features.parse_spec(options.image_encoder)
    except ValueError as e:
      raise PrepareError(f"--image_encoder: {e}") from None
    if options.image_features:
      raise PrepareError("--image_encoder and --image_features both give image features: "
                         "choose one")
  if options.image_features:
    try:
      _feature_keys(options.image_features)
    except (OSError, ValueError, zipfile.BadZipFile) as e:
      raise PrepareError(f"--image_features: cannot read {options.image_features} "
                         f"as .npz: {e}") from None
  if options.oracle:
    try:
      oracle.read_truth(options.oracle)
    except ValueError as e:
      raise PrepareError(f"--oracle: {e}") from None
  if options.vocab_from:
    read_reference(options.vocab_from)


# The flag to look at when every line of a crawl fails for a reason.
_HINTS = {
    "bad_split": "have no value train, validation or test in the field {o.split_field!r} "
                 "(set --split_field)",
    "invalid_utf8": "are not UTF-8",
    "malformed_json": "are not a JSON object (--posts takes one JSON object a line)",
    "missing_post_id": "have no field {o.id_field!r} (set --id_field)",
    "missing_user_id": "have no field {o.user_field!r} (set --user_field)",
    "no_text_no_image": "have none of the fields {o.text_fields} (set --text_fields) "
                        "or {o.image_field!r} (set --image_field)",
    "nothing_left_after_cleaning": "have no word left after cleaning and no usable image",
    "image_features_missing": "have an image without a vector in --image_features "
                              "and no text",
}


def no_posts_error(posts_path: str, options: Options, lines: int,
                   counts: collections.Counter) -> PrepareError:
  """Why a crawl gave no post: the commonest reason, its flag, the first line's fields."""
  if not lines:
    return PrepareError(f"--posts: {posts_path} has no lines")
  reason, n = max(((r, c) for r, c in counts.items() if r in _HINTS),
                  key=lambda rc: rc[1], default=("", 0))
  with open(posts_path, "rb") as f:
    first = json_object(next(line for line in f if line.strip()), 1)
  fields = (f"the first line has the fields {sorted(first)}"
            if isinstance(first, dict) else "the first line is not a JSON object")
  why = f"{n} of {lines} lines {_HINTS[reason].format(o=options)}" if n \
      else f"problems {dict(counts)}"
  return PrepareError(f"no post kept from {posts_path}: {why}; {fields}")


def split_warnings(posts_per_split: Mapping[str, int], images_per_split: Mapping[str, int],
                   num_images: int, options: Options) -> list[str]:
  """A line per held-out split with fewer than MIN_HELD_OUT posts (or images)."""
  out = []
  for split, fraction in (("validation", options.validation_fraction),
                          ("test", options.test_fraction)):
    posts, imgs = posts_per_split[split], images_per_split[split]
    wanted = posts > 0 if options.split_field else fraction > 0
    if wanted and (posts < MIN_HELD_OUT or (num_images and imgs < MIN_HELD_OUT)):
      out.append(f"the {split} split has {posts} posts and {imgs} images, too few to "
                 f"measure retrieval (< {MIN_HELD_OUT}): "
                 + ("" if options.split_field else f"raise --{split}_fraction or ")
                 + "bring more posts")
  return out


# -------------------------------------------------------------------- job -----

def prepare(posts_path: str, out_dir: str, options: Options = Options(),
            log=print) -> dict:
  """Prepares `posts_path` into `out_dir`; returns the report (also written).
  PrepareError when the crawl cannot give a dataset."""
  t0 = time.time()
  check_inputs(posts_path, options)
  root = os.path.realpath(options.image_root or os.path.dirname(os.path.abspath(posts_path)))
  issues = _Issues(posts_path)
  text.stop_words()   # gensim's import (~2 s) before the progress clocks start
  chunks = -(-(_count_lines(posts_path) + 1) // options.chunk_lines)
  with _executor(min(options.workers or os.cpu_count(), chunks)) as pool:
    posts = scan(posts_path, options, root, pool, issues)
    if options.image_encoder != "none":
      options = dataclasses.replace(options, image_features=encode_images(
          posts["image_keys"], posts["image_paths"], options.image_encoder, out_dir))
    image, indptr = posts["image"], posts["indptr"]
    lengths = np.diff(indptr)

    feature_dim = 0
    if options.image_features:
      keys = _feature_keys(options.image_features)
      fkeys = [_feature_key(keys, k) for k in posts["image_keys"]]
      for i in np.flatnonzero(image >= 0):
        if fkeys[image[i]] is None:
          issues.add(BadRecord("image_features_missing", int(posts["line"][i]),
                               posts["post_id"][i], posts["image_keys"][image[i]]),
                     options.strict)
          if lengths[i] == 0:
            issues.add(BadRecord("nothing_left_after_cleaning", int(posts["line"][i]),
                                 posts["post_id"][i]), options.strict)
      image = np.where((image >= 0) & np.array([k is None for k in fkeys] + [True])[image],
                       -1, image)
      some = next((k for k in fkeys if k is not None), None)
      feature_dim = int(np.size(_features_file(options.image_features)[some])) if some else 0

    alive = (image >= 0) | (lengths > 0)
    if not alive.any():
      raise no_posts_error(posts_path, options, posts["lines"], issues.counts)

    # Duplicates and groups.
    set_of_post, sets = dedup.word_sets(indptr, posts["word_ids"], len(posts["words"]))
    pairs, dup_stats = dedup.near_duplicate_pairs(sets, options.near_dup_threshold)
    groups = dedup.group_posts(image, set_of_post, sets.shape[0], pairs)
    reference = read_reference(options.vocab_from) if options.vocab_from else None
    known = None if reference is None else np.array(
        [u in reference.users for u in posts["users"]], bool)[posts["user"]]
    idx = np.flatnonzero(alive)
    assignment = np.full(len(image), "", dtype=object)
    assignment[idx], split_stats = assign_splits(
        groups[idx], image[idx], posts["user"][idx], options,
        known=None if known is None else known[idx],
        given=posts["split"][idx] if options.split_field else None)
    kept = assignment != ""

    # Vocabulary from the training texts (or --vocab_from's), then token ids.
    token_post = np.repeat(np.arange(len(lengths)), lengths)
    is_train = assignment == "train"
    if reference is None:
      counts = np.bincount(posts["word_ids"][is_train[token_post]],
                           minlength=len(posts["words"]))
      vocab = text.build_vocab({posts["words"][i]: int(c) for i, c in enumerate(counts) if c},
                               options.min_count)
      if len(vocab) == 2 and counts.any():
        raise PrepareError(
            f"no word occurs --min_count={options.min_count} times in the training texts "
            f"({int((counts > 0).sum())} distinct words, the commonest {int(counts.max())} "
            "times): lower --min_count or bring more posts")
    else:
      vocab = reference.vocab
    vocab_index = {w: i for i, w in enumerate(vocab[2:], 2)}
    to_vocab = np.array([vocab_index.get(w, records.UNK_ID) for w in posts["words"]],
                        np.int32).reshape(-1)
    tokens = to_vocab[posts["word_ids"]]

    # Users: --vocab_from's (each keeps its index), then those of the kept posts
    # (in order of appearance), then those who only act or follow.
    user_ids = np.unique(posts["user"][kept])
    users = dict(reference.users) if reference else {}
    for u in user_ids:
      users.setdefault(posts["users"][u], len(users))
    user_of = np.full(posts["num_users_seen"], -1, np.int64)
    user_of[user_ids] = [users[posts["users"][u]] for u in user_ids]
    user = user_of[posts["user"][kept]]
    users_from_posts = len(users)
    written = np.flatnonzero(kept)
    post_ids = np.array(posts["post_id"], dtype=object)
    graph, interactions = {}, {}
    if options.actions:
      action_issues = _Issues(options.actions, INTERACTION_ERRORS)
      graph["actions"], graph["action_kinds"] = read_actions(
          options.actions, options, {p: r for r, p in enumerate(post_ids[written])},
          set(posts["post_id"]), posts["timestamp"][written], users, action_issues)
      interactions["actions"] = _interaction_report(
          options.actions, len(graph["actions"]), action_issues)
    if options.follows:
      follow_issues = _Issues(options.follows, INTERACTION_ERRORS)
      graph["follows"] = read_follows(options.follows, options, users, follow_issues)
      interactions["follows"] = _interaction_report(
          options.follows, len(graph["follows"]), follow_issues)
    num_users = len(users)

    os.makedirs(out_dir, exist_ok=True)
    records.write_lines(out_dir, records.VOCAB_FILE, vocab)
    records.write_lines(out_dir, records.USERS_FILE, users)
    interests = None
    if options.interest_field:
      per_user = user_interests(user, posts["interest"][kept], posts["interest_labels"],
                                num_users)
      records.write_lines(out_dir, records.INTERESTS_FILE, map("\t".join, per_user))
      interests = dict(field=options.interest_field,
                       labels=len({x for labels in per_user for x in labels}),
                       users_with_interests=sum(map(bool, per_user)))

    notes = []
    if reference is not None and reference.words is not None:
      train_tok = is_train[token_post]
      means = word2vec.user_means(reference.words, user_of[posts["user"][token_post[train_tok]]],
                                  tokens[train_tok], num_users)
      means[:len(reference.users)] = reference.user_rows
      records.save_npz(os.path.join(out_dir, word2vec.INIT_FILE), words=reference.words,
                       users=means)
    elif reference is not None:
      notes.append(f"--vocab_from has no {word2vec.INIT_FILE}: none written")
    elif options.word2vec_dim and len(vocab) > 2:
      t_w2v = time.time()
      train_posts = np.flatnonzero(is_train)
      model = word2vec.train(
          _Sentences(vocab, lambda: (tokens[indptr[i]:indptr[i + 1]] for i in train_posts)),
          dim=options.word2vec_dim, epochs=options.word2vec_epochs, seed=options.seed)
      words = word2vec.word_matrix(model, vocab)
      train_tok = is_train[token_post]
      user_means = word2vec.user_means(words, user_of[posts["user"][token_post[train_tok]]],
                                       tokens[train_tok], num_users)
      records.save_npz(os.path.join(out_dir, word2vec.INIT_FILE), words=words,
                       users=user_means)
      log(f"word2vec: {len(vocab)} words x {options.word2vec_dim} on the training "
          f"texts in {time.time() - t_w2v:.1f}s")
    elif options.word2vec_dim:
      notes.append(f"no training text: no {word2vec.INIT_FILE}")

    # Pass 2: the image tables (row = image id), then the records of each split.
    image_ids = np.unique(image[kept & (image >= 0)])
    image_of = np.full(len(posts["image_paths"]) + 1, -1, np.int64)
    image_of[image_ids] = np.arange(len(image_ids))
    paths = [posts["image_paths"][j] for j in image_ids]
    without_pixels = sum(p is None for p in paths)
    image_size = options.image_size if len(image_ids) > without_pixels else 0
    if feature_dim and len(image_ids):
      table = records.new_table(out_dir, "image_features", (len(image_ids), feature_dim),
                                np.float32)
      for row, j in enumerate(image_ids):
        table[row] = _features_file(options.image_features)[fkeys[j]]
      table.flush()
    if image_size:
      table = records.new_table(out_dir, "image", (len(image_ids), image_size, image_size, 3),
                                np.uint8)
      bar = progress.bar(len(paths), "pass 2 (image pixels)", "images", delay=2)
      step = options.chunk_lines
      chunks = (((paths[s:s + step], options), s) for s in range(0, len(paths), step))
      for pixels, s in ordered_map(pool, _pixels_chunk, chunks, 2 * pool._max_workers):
        table[s:s + len(pixels)] = pixels
        bar.update(len(pixels))
      table.flush()
      bar.close()

    lengths_kept = np.minimum(lengths, records.MAX_LEN)[:, None]
    token_or_pad = np.append(tokens, records.PAD_ID)     # index -1: padding
    at = np.arange(records.MAX_LEN)
    def chunks(members):
      for s in range(0, len(members), options.chunk_lines):
        m = members[s:s + options.chunk_lines]
        yield records.post_rows(
            user_of[posts["user"][m]], image_of[image[m]], posts["timestamp"][m],
            token_or_pad[np.where(at < lengths_kept[m], indptr[m][:, None] + at, -1)]), \
            [posts["post_id"][i] for i in m]
        bar.update(len(m))

    split_meta, bar = {}, progress.bar(int(kept.sum()), "pass 2 (write shards)", "posts",
                                       delay=2)
    for split in records.SPLITS:
      split_meta[split] = records.write_split(
          out_dir, split, chunks(np.flatnonzero(assignment == split)), options.num_shards,
          options.block_posts)
    bar.close()

  if graph:
    records.save_npz(
        os.path.join(out_dir, records.GRAPH_FILE),
        follows=graph.get("follows", np.zeros([0, 2], np.int64)),
        actions=graph.get("actions", np.zeros([0, 3], np.int64)),
        action_kinds=np.array(graph.get("action_kinds", []), str),
        post_ids=np.array(post_ids[written].tolist(), str))
  if options.oracle:
    shutil.copyfile(options.oracle, os.path.join(out_dir, oracle.ORACLE_FILE))
  metadata = dict(
      source="prepared", posts=os.path.abspath(posts_path), num_users=num_users,
      users_with_posts=len(user_ids), vocab_size=len(vocab), max_len=records.MAX_LEN,
      **({} if reference is None else dict(vocab_from=reference.path,
                                           num_known_users=len(reference.users))),
      feature_dim=feature_dim,
      image_size=image_size,
      num_images=len(image_ids), splits=split_meta)
  records.write_metadata(out_dir, metadata)
  images_in = {s: int(len(np.unique(image[(assignment == s) & (image >= 0)])))
               for s in records.SPLITS}
  posts_in = {s: m["num_posts"] for s, m in split_meta.items()}
  if not feature_dim:
    notes.append("no image features: train with --config.model.image_input=pixels"
                 if len(image_ids) else
                 "no images: the image-text and image-user terms contribute nothing; the "
                 "default --config.model.image_input=features (feature_dim 0) trains the "
                 "text and user towers")
  report = dict(
      posts_file=os.path.abspath(posts_path), out_dir=os.path.abspath(out_dir),
      seconds=round(time.time() - t0, 1),
      posts_valid=int(alive.sum()), posts_written=int(kept.sum()),
      posts_per_split=posts_in, unique_images_per_split=images_in,
      users=num_users, users_without_posts=num_users - users_from_posts,
      vocab_size=len(vocab), num_images=len(image_ids),
      images_without_pixels=int(without_pixels), feature_dim=feature_dim,
      image_size=metadata["image_size"],
      posts_with_image=int((kept & (image >= 0)).sum()),
      posts_with_text=int((kept & (lengths > 0)).sum()),
      duplicates=dict(
          posts_with_image_shared_by_another_post=int(
              (kept & (image >= 0)).sum() - len(image_ids)),
          posts_repeating_an_earlier_word_set=int((set_of_post >= 0).sum() - sets.shape[0]),
          **dup_stats),
      splits=split_stats, interests=interests, problems=issues.report(),
      vocab_from=reference and dict(
          dir=reference.path, known_users=len(reference.users),
          known_users_with_posts=int(np.sum(user_of[user_ids] < len(reference.users))),
          new_users=num_users - len(reference.users),
          posts_by_new_users=int(np.sum(user >= len(reference.users)))),
      **interactions, oracle=options.oracle and os.path.abspath(options.oracle),
      warnings=split_warnings(posts_in, images_in, len(image_ids), options), notes=notes)
  with open(os.path.join(out_dir, REPORT_FILE), "w") as f:
    json.dump(report, f, indent=1)
  return report


def summary(report: dict) -> str:
  """A few readable lines of a report."""
  listed = lambda problems: ", ".join(f"{r} {p['count']}" for r, p in problems.items()) \
      or "none"
  d = report["duplicates"]
  return "\n".join([
      f"Prepared {report['posts_file']} -> {report['out_dir']} in {report['seconds']}s",
      f"  posts: {report['posts_valid']} valid, {report['posts_written']} written "
      f"{report['posts_per_split']}",
      f"  users {report['users']} ({report['users_without_posts']} only act or follow), "
      f"vocabulary {report['vocab_size']}, unique images {report['num_images']} "
      f"{report['unique_images_per_split']} ({report['images_without_pixels']} as features "
      f"only), posts with image {report['posts_with_image']}, with text "
      f"{report['posts_with_text']}",
      f"  duplicates: {d['posts_with_image_shared_by_another_post']} posts re-use an image, "
      f"{d['posts_repeating_an_earlier_word_set']} repeat a text, "
      f"{d['near_duplicate_pairs']} near-duplicate text pairs",
      f"  splits: {report['splits']}",
      *([f"  interests ({i['field']}): {i['labels']} labels, {i['users_with_interests']} "
         f"of {report['users']} users have one"] if (i := report.get("interests")) else []),
      f"  problems: {listed(report['problems'])}",
      *[f"  {kind}: {r['written']} written; problems: {listed(r['problems'])}"
        for kind in ("actions", "follows") if (r := report.get(kind))],
      *([f"  vocabulary, users and word vectors of {r['dir']}: {r['new_users']} users new to "
         f"its {r['known_users']} (appended after them; {r['posts_by_new_users']} posts), "
         f"{r['known_users_with_posts']} of its users post here"]
        if (r := report.get("vocab_from")) else []),
      *([f"  planted truth: {report['oracle']}"] if report.get("oracle") else []),
      *[f"  warning: {w}" for w in report["warnings"]],
      *[f"  note: {n}" for n in report["notes"]]])
