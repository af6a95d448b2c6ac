"""DU2MCE for the 20 Newsgroups posts on a 2-core CPU (text only), with the
tweets config's text filters and batch (200), D = 256 and 6 epochs.

  python launch/prepare_data.py --posts=../shared/data/newsgroups20/posts.jsonl \\
      --out=runs/newsgroups_data --text_fields=subject,text --interest_field=group
  python launch/train.py --config=configs/du2mce_newsgroups.py \\
      --config.data.dir=runs/newsgroups_data --workdir=runs/newsgroups
  python launch/interests.py --workdir=runs/newsgroups

No images: the text-user pair only (the "tu" variant); image_input is
"features" with feature_dim 0 (an image tower without parameters, no pixel
CNN). Word and user tables start from the data's 300-d Word2Vec; validation
every epoch keeps the best checkpoint.

Variant "track": the user-interest evaluator (the paper's Table 3, a linear
SVM per newsgroup on the user vectors, beside Avg-Text) every epoch on both
the tower's output and its table row, not used for selection
(docs/real_data.md).
"""

from configs import du2mce, du2mce_tweets

INTERESTS = {"type": "interests", "split": "train", "folds": 5, "seed": 0,
             "batch_size": 1000, "user_vectors": "output"}


def get_config(variant: str = ""):
  if variant not in ("", "track"):
    raise ValueError(f"unknown newsgroups variant {variant!r}; one of '', 'track'")
  config = du2mce_tweets.get_config()
  config.model.embed_dim = 256
  config.num_epochs = 6
  config.lr_decay_epochs = 4
  config.update_from_flattened_dict(du2mce.VARIANTS["tu"])
  config.model.image_input = "features"
  config.evals.val.every_steps = 48
  if variant == "track":
    config.evals.interests_output = {**INTERESTS, "every_steps": 48}
    config.evals.interests_table = {**INTERESTS, "every_steps": 48, "user_vectors": "table"}
  return config
