"""CDL: comparative deep learning of which images a user prefers.

  python launch/train.py --config=configs/cdl.py --workdir=runs/cdl
  python launch/train.py --config=configs/cdl.py:twonets --workdir=runs/cdl_twonets

Triplets (user, preferred image, another image); an AlexNet-shaped image net
(narrowed by model.image_width for a CPU) and a user net over the user's bag
of semantic clusters into one space; a learned weighted L2 distance (squared
differences, dropout 0.5, Dense to a scalar); the cross-entropy on
sigmoid(D- - D+) (variants: hinge, and the pairwise TwoNets baseline). For
each user 20 preferred images, chosen at random, are held out and ranked among
80 other images (the paper's 20 + 80): P@K and R@K per user. Trained with
Adam (see below).
"""

import ml_collections

from configs import recommendation

VARIANTS = ("cdl", "hinge", "twonets")


def get_config(variant: str = "cdl"):
  if variant not in VARIANTS:
    raise ValueError(f"unknown CDL variant {variant!r}; one of {VARIANTS}")
  config = recommendation.get_config()
  config.data.embedded.update(actions_per_user=100, image_fraction=0.5)
  config.data.interactions.update(test=20, validation=5, images_only=True, order_by="random",
                                  negatives="random", semantic_clusters=200)
  config.model = ml_collections.ConfigDict({
      "name": "cdl",
      "embed_dim": 256,            # the paper: 1024
      "image_input": "pixels",     # or "features" (frozen-CNN features, dense layers only)
      "image_width": 0.125,        # x AlexNet widths (convs 96-256-384-384-256, fc 4096-4096)
      "user_hidden": (256,),       # Dense widths before the last: [K] -> ... -> D
      "dropout": 0.5,
      "dtype": "float32",
      "loss": {"variant": variant,   # "cdl", "hinge" or "twonets"
               "margin": 1.0},       # hinge only
  })
  # Adam, not the paper's SGD: on the 32-px embedded corpus SGD (lr 0.01, momentum
  # 0.9) left the test AUC at 0.515 after 10 epochs, Adam reaches 0.708 (docs/models.md).
  config.optimizer = "adam"
  config.learning_rate = 1e-3
  for name in ("val", "test"):
    config.evals[name].update(protocol="sampled", negatives_per_positive=4,
                              at=(1, 5, 10, 20), select="R@10")
  return config
