"""Text cleaning as the paper, the training vocabulary and token ids."""

from input_pipeline import records, text


def test_clean_text_removes_urls_mentions_emoticons_and_stopwords():
  raw = ("RT @CNN: Shark swimming in #NewJersey :) 🦈 http://t.co/x7 www.a.com/b "
         "THE storm;-) and... it's 3D!")
  assert text.clean_text(raw) == ["shark", "swimming", "newjersey", "storm", "s", "3d"]


def test_clean_text_keeps_other_scripts_and_may_be_empty():
  assert text.clean_text("Tubarões nas ruas \\n الصبي") == ["tubarões", "nas", "ruas", "الصبي"]
  assert text.clean_text("http://t.co/abc @someone :-( 😢 #") == []


def test_vocab_keeps_words_seen_min_count_times_by_count():
  counts = text.count_words([["b", "a", "b"], ["a", "b", "c"], ["c", "a", "d"]])
  vocab = text.build_vocab(counts, min_count=2)
  assert vocab == [text.PAD, text.UNK, "a", "b", "c"]
  index = {w: i for i, w in enumerate(vocab)}
  assert text.encode(["c", "zzz", "a"], index) == [4, records.UNK_ID, 2]
