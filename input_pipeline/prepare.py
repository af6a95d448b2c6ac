"""How does a user's raw crawl (JSONL + image folder) become training shards?

Two streaming passes, spread over processes (chunks of lines):
  1. parse each line, clean its text, resolve/decode/hash its image, and keep
     only small per-post metadata (ids, word ids, image index) in NumPy arrays;
  2. (after deduplication, grouping, splitting and the vocabulary) re-read the
     images from disk and write the records of each split, shard by shard.
Nothing holds all images or decoded pixels: an image is decoded once per
worker while it stays in a small cache.

Bad input is reported, never fatal: each problem has a named reason counted in
`prepare_report.json` with example line numbers; the post is skipped, or only
its broken part (image or text) is dropped. With `strict`, the first bad
record stops the job (PrepareError names the line).

Splits: groups of posts linked by a shared image or a near-duplicate text
(`dedup`) never straddle splits; groups with images are split first, then
text-only groups. Only groups where at least `min_held_out_known` of the
posts have an author who also posts in another group can be held out (the
others stay in training); held-out posts whose author then has no training
post are dropped (both counted), so every user of validation and test exists
in train. `held_out_authors="any"` lifts that rule (corpora where almost every
author posts once); the report then counts held-out posts of unseen authors.

Interests: with `interest_field`, a user's interest labels are the values of
that field over all their kept posts (every split), one line per user index
in `interests.txt` (for sempre_jax.analysis.interests).
"""

import collections
import dataclasses
import datetime
import functools
import json
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent import futures

import numpy as np

from input_pipeline import dedup, images, records, splits, text, word2vec

REPORT_FILE = "prepare_report.json"
EXAMPLES = 5
# Problems that drop a post or part of it (fatal with --strict); others are notes.
ERRORS = ("invalid_utf8", "malformed_json", "missing_post_id", "missing_user_id",
          "no_text_no_image", "duplicate_post_id", "corrupt_image", "truncated_image",
          "image_too_large", "image_outside_corpus", "image_missing",
          "image_features_missing")
NOTES = ("non_rgb_image", "empty_text_after_cleaning", "nothing_left_after_cleaning",
         "bad_timestamp")


class PrepareError(ValueError):
  """A bad record under `strict`: the message names its line."""


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
  max_image_pixels: int = images.MAX_PIXELS
  test_fraction: float = 0.2
  validation_fraction: float = 0.02
  held_out_authors: str = "in_train"  # or "any": no author rule (counted in the report)
  min_held_out_known: float = 0.5   # held-out groups: min. share of posts whose
                                    # author posts in another group (else train)
  min_count: int = 5
  near_dup_threshold: float = 0.8
  num_shards: int = 4
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


def parse_line(line: bytes, line_no: int, options: Options) -> dict | BadRecord:
  """One JSONL line -> {post_id, user_id, text, image, timestamp, interest} or BadRecord."""
  try:
    decoded = line.decode("utf-8")
  except UnicodeDecodeError as e:
    return BadRecord("invalid_utf8", line_no, detail=str(e))
  try:
    post = json.loads(decoded)
  except json.JSONDecodeError as e:
    return BadRecord("malformed_json", line_no, detail=str(e))
  if not isinstance(post, dict):
    return BadRecord("malformed_json", line_no, detail="not a JSON object")
  post_id = _field(post, options.id_field)
  if post_id is None:
    return BadRecord("missing_post_id", line_no)
  user = _field(post, options.user_field)
  if user is None:
    return BadRecord("missing_user_id", line_no, post_id)
  raw_text = " ".join(str(post[f]) for f in options.text_fields if post.get(f))
  image = _field(post, options.image_field)
  if not raw_text.strip() and image is None:
    return BadRecord("no_text_no_image", line_no, post_id)
  stamp = post.get(options.timestamp_field)   # absent: 0; unreadable: None (noted)
  interest = _field(post, options.interest_field) if options.interest_field else None
  return dict(post_id=post_id, user_id=user, text=raw_text, image=image,
              timestamp=0 if stamp is None else parse_timestamp(stamp),
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
      bad(e.reason, post["image"])
      path = None
  if not words and path is None:
    bad("nothing_left_after_cleaning")
    return None, issues
  return dict(words=words, image_path=path, image_key=post["image"],
              pixel_hash=pixel_hash, post_id=post["post_id"], user_id=post["user_id"],
              timestamp=post["timestamp"] or 0, interest=post["interest"],
              line=line_no), issues


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
      issues=issues, words=list(local), word_ids=np.asarray(ids, np.int32),
      lengths=np.asarray([len(p["words"]) for p in kept], np.int32),
      **{k: [p[k] for p in kept] for k in (
          "post_id", "user_id", "timestamp", "line", "image_path", "image_key",
          "pixel_hash", "interest")})


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


class _Progress:
  """A carriage-return progress line: posts/s and ETA from a done fraction."""

  def __init__(self, label: str, stream=sys.stderr):
    self.label, self.stream, self.t0, self.last = label, stream, time.time(), 0.0

  def update(self, posts: int, fraction: float, force: bool = False) -> None:
    now = time.time()
    if not force and now - self.last < 2:
      return
    self.last = now
    rate = posts / max(now - self.t0, 1e-9)
    eta = (now - self.t0) * (1 - fraction) / max(fraction, 1e-9)
    self.stream.write(f"\r{self.label}: {posts} posts, {rate:,.0f} posts/s, "
                      f"{100 * fraction:.0f}%, ETA {eta:.0f}s   ")
    if force:
      self.stream.write("\n")
    self.stream.flush()


@dataclasses.dataclass
class _Issues:
  """Counts and example locations per reason."""
  counts: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  examples: dict = dataclasses.field(default_factory=lambda: collections.defaultdict(list))

  def add(self, issue: BadRecord, strict: bool) -> None:
    if strict and issue.reason in ERRORS:
      raise PrepareError(f"line {issue.line}: {issue.reason}"
                         + (f" (post {issue.post_id})" if issue.post_id else "")
                         + (f": {issue.detail}" if issue.detail else ""))
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
  progress, n_posts = _Progress("pass 1 (clean, hash images)"), 0
  chunks = _line_chunks(posts_path, options.chunk_lines, options, root)
  for res, offset in ordered_map(pool, _pass1_chunk, chunks, 2 * pool._max_workers):
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
      interest = res["interest"][i]
      cols["interest"].append(-1 if interest is None else
                              interest_index.setdefault(interest, len(interest_index)))
    n_posts += int(keep.sum())
    progress.update(n_posts, offset / size)
  progress.update(n_posts, 1.0, force=True)
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
      interest_labels=list(interest_index))


# ------------------------------------------------------------- features ------

def _feature_key(keys: Sequence[str], key: str) -> str | None:
  """The .npz key of an image: its path as given, its file name, or its stem."""
  for k in (key, os.path.basename(key), os.path.splitext(os.path.basename(key))[0]):
    if k in keys:
      return k
  return None


@functools.lru_cache(maxsize=2)
def _features_file(path: str):
  return np.load(path)


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
                  options: Options) -> tuple[np.ndarray, dict]:
  """[N] split name per post ("" = dropped: its user has no training post)."""
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
  for k, has_image in enumerate((True, False)):   # images first, then text-only posts
    sel = eligible[groups] & (with_image[groups] == has_image)
    if sel.any():
      assignment[sel] = splits.split_by_group(groups[sel], fractions, options.seed + k)
  in_train = np.zeros(int(user.max(initial=-1)) + 1, bool)
  in_train[user[assignment == "train"]] = True
  dropped = (assignment != "train") & ~in_train[user] & (options.held_out_authors != "any")
  stats = {"groups": num_groups, "groups_with_images": int(with_image.sum()),
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

def _pass2_chunk(args) -> list[bytes]:
  """Post columns of one chunk -> serialized records (images re-read from disk)."""
  posts, options = args
  feats = _features_file(options.image_features) if options.image_features else None
  out = []
  for post in posts:
    if post["image_path"] is not None:
      loaded = _cached_image(post["image_path"], options.image_size,
                             options.max_image_pixels)
      post["image_encoded"] = loaded.encoded
      if feats is not None:
        post["image_features"] = feats[post["feature_key"]]
    out.append(records.serialize(post))
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


def _executor(workers: int) -> futures.Executor:
  if workers == 1:
    return _InlineExecutor()
  import multiprocessing
  return futures.ProcessPoolExecutor(
      workers, mp_context=multiprocessing.get_context("forkserver"))


# -------------------------------------------------------------------- job -----

def prepare(posts_path: str, out_dir: str, options: Options = Options(),
            log=print) -> dict:
  """Prepares `posts_path` into `out_dir`; returns the report (also written)."""
  t0 = time.time()
  os.makedirs(out_dir, exist_ok=True)
  root = os.path.realpath(options.image_root or os.path.dirname(os.path.abspath(posts_path)))
  issues = _Issues()
  with _executor(options.workers or os.cpu_count()) as pool:
    posts = scan(posts_path, options, root, pool, issues)
    image, indptr = posts["image"], posts["indptr"]
    lengths = np.diff(indptr)

    feature_dim = 0
    if options.image_features:
      keys = set(_features_file(options.image_features).files)
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

    # Duplicates and groups.
    set_of_post, sets = dedup.word_sets(indptr, posts["word_ids"], len(posts["words"]))
    pairs, dup_stats = dedup.near_duplicate_pairs(sets, options.near_dup_threshold)
    groups = dedup.group_posts(image, set_of_post, sets.shape[0], pairs)
    alive = (image >= 0) | (lengths > 0)
    idx = np.flatnonzero(alive)
    assignment = np.full(len(image), "", dtype=object)
    assignment[idx], split_stats = assign_splits(groups[idx], image[idx],
                                                 posts["user"][idx], options)
    kept = assignment != ""

    # Users and images of the kept posts, re-indexed densely.
    user_ids, user = np.unique(posts["user"][kept], return_inverse=True)
    user_of = np.full(posts["num_users_seen"], -1, np.int64)
    user_of[user_ids] = np.arange(len(user_ids))
    image_ids = np.unique(image[kept & (image >= 0)])
    image_of = np.full(len(posts["image_paths"]) + 1, -1, np.int64)
    image_of[image_ids] = np.arange(len(image_ids))

    # Vocabulary from the training texts, then token ids.
    token_post = np.repeat(np.arange(len(lengths)), lengths)
    is_train = assignment == "train"
    counts = np.bincount(posts["word_ids"][is_train[token_post]],
                         minlength=len(posts["words"]))
    vocab = text.build_vocab({posts["words"][i]: int(c) for i, c in enumerate(counts) if c},
                             options.min_count)
    to_vocab = np.full(len(posts["words"]), records.UNK_ID, np.int32)
    index = {w: i for i, w in enumerate(posts["words"])}
    to_vocab[[index[w] for w in vocab[2:]]] = np.arange(2, len(vocab))
    tokens = to_vocab[posts["word_ids"]]
    records.write_lines(out_dir, records.VOCAB_FILE, vocab)
    records.write_lines(out_dir, records.USERS_FILE,
                        (posts["users"][u] for u in user_ids))
    interests = None
    if options.interest_field:
      per_user = user_interests(user, posts["interest"][kept], posts["interest_labels"],
                                len(user_ids))
      records.write_lines(out_dir, records.INTERESTS_FILE, map("\t".join, per_user))
      interests = dict(field=options.interest_field,
                       labels=len({x for labels in per_user for x in labels}),
                       users_with_interests=sum(map(bool, per_user)))

    if options.word2vec_dim:
      t_w2v = time.time()
      train_posts = np.flatnonzero(is_train)
      model = word2vec.train(
          _Sentences(vocab, lambda: (tokens[indptr[i]:indptr[i + 1]] for i in train_posts)),
          dim=options.word2vec_dim, epochs=options.word2vec_epochs,
          workers=options.workers or os.cpu_count(), seed=options.seed)
      words = word2vec.word_matrix(model, vocab)
      train_tok = is_train[token_post]
      users = word2vec.user_means(words, user_of[posts["user"][token_post[train_tok]]],
                                  tokens[train_tok], len(user_ids))
      np.savez(os.path.join(out_dir, word2vec.INIT_FILE), words=words, users=users)
      log(f"word2vec: {len(vocab)} words x {options.word2vec_dim} on the training "
          f"texts in {time.time() - t_w2v:.1f}s")

    # Pass 2: the records of each split.
    fkey = (lambda i: fkeys[image[i]]) if options.image_features else (lambda i: None)
    def chunks(members):
      for s in range(0, len(members), options.chunk_lines):
        batch = []
        for i in members[s:s + options.chunk_lines]:
          img = image[i]
          batch.append(dict(
              post_id=posts["post_id"][i], user=int(user_of[posts["user"][i]]),
              tokens=tokens[indptr[i]:indptr[i + 1]][:records.MAX_LEN],
              image_id=int(image_of[img]) if img >= 0 else -1,
              image_path=posts["image_paths"][img] if img >= 0 else None,
              feature_key=fkey(i), timestamp=int(posts["timestamp"][i])))
        yield (batch, options), min(s + options.chunk_lines, len(members))

    split_meta, progress = {}, _Progress("pass 2 (write shards)")
    total, done = max(int(kept.sum()), 1), 0
    for split in records.SPLITS:
      members = np.flatnonzero(assignment == split)
      def payloads():
        nonlocal done
        for batch, _ in ordered_map(pool, _pass2_chunk, chunks(members),
                                    2 * pool._max_workers):
          yield from batch
          done += len(batch)
          progress.update(done, done / total)
      split_meta[split] = records.write_payloads(out_dir, split, payloads(),
                                                 options.num_shards)
    progress.update(done, 1.0, force=True)

  metadata = dict(
      source="prepared", posts=os.path.abspath(posts_path), num_users=len(user_ids),
      vocab_size=len(vocab), max_len=records.MAX_LEN, feature_dim=feature_dim,
      image_size=options.image_size, num_images=len(image_ids), splits=split_meta)
  records.write_metadata(out_dir, metadata)
  images_in = {s: int(len(np.unique(image[(assignment == s) & (image >= 0)])))
               for s in records.SPLITS}
  report = dict(
      posts_file=os.path.abspath(posts_path), out_dir=os.path.abspath(out_dir),
      seconds=round(time.time() - t0, 1),
      posts_valid=int(alive.sum()), posts_written=int(kept.sum()),
      posts_per_split={s: m["num_posts"] for s, m in split_meta.items()},
      unique_images_per_split=images_in,
      users=len(user_ids), vocab_size=len(vocab), num_images=len(image_ids),
      feature_dim=feature_dim, image_size=options.image_size,
      posts_with_image=int((kept & (image >= 0)).sum()),
      posts_with_text=int((kept & (lengths > 0)).sum()),
      duplicates=dict(
          posts_with_image_shared_by_another_post=int(
              (kept & (image >= 0)).sum() - len(image_ids)),
          posts_repeating_an_earlier_word_set=int((set_of_post >= 0).sum() - sets.shape[0]),
          **dup_stats),
      splits=split_stats, interests=interests, problems=issues.report(),
      notes=[] if feature_dim else [
          "no image features: train with --config.model.image_input=pixels"
          if len(image_ids) else
          "no images: the image-text and image-user terms contribute nothing; the "
          "default --config.model.image_input=features (feature_dim 0) trains the "
          "text and user towers"])
  with open(os.path.join(out_dir, REPORT_FILE), "w") as f:
    json.dump(report, f, indent=1)
  return report


def summary(report: dict) -> str:
  """A few readable lines of a report."""
  problems = ", ".join(f"{r} {p['count']}" for r, p in report["problems"].items()) or "none"
  d = report["duplicates"]
  return "\n".join([
      f"Prepared {report['posts_file']} -> {report['out_dir']} in {report['seconds']}s",
      f"  posts: {report['posts_valid']} valid, {report['posts_written']} written "
      f"{report['posts_per_split']}",
      f"  users {report['users']}, vocabulary {report['vocab_size']}, unique images "
      f"{report['num_images']} {report['unique_images_per_split']}, posts with image "
      f"{report['posts_with_image']}, with text {report['posts_with_text']}",
      f"  duplicates: {d['posts_with_image_shared_by_another_post']} posts re-use an image, "
      f"{d['posts_repeating_an_earlier_word_set']} repeat a text, "
      f"{d['near_duplicate_pairs']} near-duplicate text pairs",
      f"  splits: {report['splits']}",
      *([f"  interests ({i['field']}): {i['labels']} labels, {i['users_with_interests']} "
         f"of {report['users']} users have one"] if (i := report.get("interests")) else []),
      f"  problems: {problems}",
      *[f"  note: {n}" for n in report["notes"]]])
