"""D-Sempre: deep semantic-preserving embeddings of users and posts for recommendation.

  python launch/train.py --config=configs/dsempre.py --workdir=runs/dsempre

Users as bags of semantic clusters (k-means over mean Word2Vec vectors of the
post texts, 2,000 clusters), posts through a 5-layer ConvNet on pixels and a
text branch; Euclidean distances; the cross-instance triplet hinge (user,
acted post, a non-acted post published near the action: +-60 min, closer ones
likelier) plus 0.3 x the within-instance semantic-preserving hinge; SGD with
momentum 0.9, learning rate 0.01, weight decay 1e-5. Each user's most recent
actions are the test set; P@K and R@K per user over every post.
"""

import ml_collections

from configs import recommendation


def get_config():
  config = recommendation.get_config()
  config.data.interactions.update(negatives="time_window", window_minutes=60.0,
                                  semantic_clusters=2000)
  config.model = ml_collections.ConfigDict({
      "name": "dsempre",
      "embed_dim": 128,             # the paper: 256
      "user_hidden": 256,           # user branch: K -> hidden -> D (paper: 512)
      "word_dim": 64,               # paper: 300
      "branch_dim": 256,            # image and text branch outputs (paper: 512)
      "conv_channels": (16, 32, 64, 64, 128),   # 5 conv 3x3 layers (paper: 32..256)
      "pool_after": (0, 1),         # 2x2 max-pool after conv 1 and 2
      "image_input": "pixels",      # or "features" (frozen-CNN)
      "dropout": 0.5,
      "bn_momentum": 0.9,
      "semantic_weight": 0.3,       # lambda of Eq. 4
      "margin": 1.0,                # on the plain Euclidean distance
      "semantic_triplets": True,    # the pipeline adds sem_* triplets
      "dtype": "float32",
  })
  config.optimizer = "sgd"
  config.learning_rate = 0.01
  config.momentum = 0.9
  config.weight_decay = 1e-5
  config.num_epochs = 10
  for name in ("val", "test"):
    config.evals[name].update(protocol="all", at=(1, 5, 10, 20), select="R@10")
  return config
