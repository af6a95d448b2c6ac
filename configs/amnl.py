"""AMNL (Zhao et al. 2018): which posts does a user re-share, given whom they follow?

  python launch/train.py --config=configs/amnl.py --workdir=runs/amnl
  python launch/train.py --config=configs/amnl.py:image --workdir=runs/amnl_image

Triplets (user, re-shared post, a followee's post the user did not re-share),
Adam, L2 regularisation; each user's actions split by time (80% train by
default: variants 60, 70, 80 set the paper's ratios), image-only and text-only
variants (image, text). Evaluated by P@1, P@3 and AUC over each user's
held-out re-shares against their followees' other posts.
"""

import ml_collections

from configs import recommendation

VARIANTS = {
    "both": {}, "image": {"model.modalities": "image"}, "text": {"model.modalities": "text"},
    "60": {"data.interactions.test": 0.4}, "70": {"data.interactions.test": 0.3},
    "80": {},
}


def get_config(variant: str = "both"):
  if variant not in VARIANTS:
    raise ValueError(f"unknown AMNL variant {variant!r}; one of {sorted(VARIANTS)}")
  config = recommendation.get_config()
  config.data.embedded.update(image_size=0, followees=10)
  config.data.interactions.update(test=0.2, validation=0.0, negatives="followee")
  config.model = ml_collections.ConfigDict({
      "name": "amnl",
      "image_input": "features",
      "embed_dim": 64,         # D: users, posts and the attention's hidden size
      "lstm_dim": 64,          # the LSTM's state y
      "word_dim": 64,          # the Word2Vec size of launch/prepare_data.py
      "margin": 1.0,           # c of the hinge
      "modalities": "both",    # or "image", "text"
      "dtype": "float32",      # compute dtype: "bfloat16" for mixed precision
  })
  config.loss.l2 = 1e-6
  config.learning_rate = 1e-3
  # No validation split: the test split is ranked with the final parameters.
  del config.evals["val"]
  config.best = ""
  config.evals.test.update(protocol="followees", at=(1, 3), select="AUC")
  config.update_from_flattened_dict(VARIANTS[variant])
  return config
