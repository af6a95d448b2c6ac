"""How does a raw post text become words, and words become token ids?

Cleaning follows the DU2MCE paper's preparation of tweets and Instagram
captions: lowercase; URLs, @mentions, emoticons/emoji and every other
non-alphanumeric character removed; hashtags kept as words ("#Sandy" ->
"sandy"); English stopwords removed (gensim's fixed list, plus the retweet
marker "rt"). The vocabulary holds the words seen at least `min_count` times
in the training split; id 0 is padding and id 1 the unknown word.
"""

import collections
import functools
import re
from collections.abc import Iterable, Mapping, Sequence

from input_pipeline import records

PAD, UNK = "<pad>", "<unk>"

_URL = re.compile(r"(?:https?://|ftp://|www\.)\S*", re.IGNORECASE)
_MENTION = re.compile(r"@\w+")
# Western emoticons such as :) ;-( :D =P <3 (emoji fall to the alphanumeric filter).
_EMOTICON = re.compile(r"(?<!\w)(?:[:;=8][-'^o]?[)(\]\[dDpP/\\|*oO3]+|<3)(?!\w)")
_WORD = re.compile(r"[^\W_]+")   # runs of Unicode letters and digits


@functools.cache
def stop_words() -> frozenset[str]:
  """gensim's English stopwords and "rt" (gensim imported on first use: ~2 s)."""
  from gensim.parsing.preprocessing import STOPWORDS
  return frozenset(STOPWORDS) | {"rt"}


def clean_text(text: str) -> list[str]:
  """Raw text -> cleaned words, in order (possibly empty)."""
  text = text.replace("\\n", " ")   # escaped newlines left in crawled text
  text = _EMOTICON.sub(" ", _MENTION.sub(" ", _URL.sub(" ", text)))
  stop = stop_words()
  return [w for w in _WORD.findall(text.lower()) if w not in stop]


def build_vocab(counts: Mapping[str, int], min_count: int = 5) -> list[str]:
  """Word counts -> [PAD, UNK, words with count >= min_count by count, then word]."""
  kept = sorted((w for w, c in counts.items() if c >= min_count),
                key=lambda w: (-counts[w], w))
  return [PAD, UNK] + kept


def count_words(texts: Iterable[Sequence[str]]) -> collections.Counter:
  counts = collections.Counter()
  for words in texts:
    counts.update(words)
  return counts


def encode(words: Sequence[str], index: Mapping[str, int]) -> list[int]:
  """Words -> ids (UNK_ID for out-of-vocabulary words), not truncated."""
  return [index.get(w, records.UNK_ID) for w in words]
