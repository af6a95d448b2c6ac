"""Shared settings of the recommendation models (D-Sempre, CDL, AMNL): the
embedded corpus with actions, the per-user split of the actions, the
evaluation. configs/dsempre.py, configs/cdl.py and configs/amnl.py build on it.
"""

import ml_collections

from configs import du2mce

# The recommendation evaluator's settings (sempre_jax/evals/recommendation.py).
RECOMMENDATION = {
    "type": "recommendation",
    "batch_size": 512,
    "protocol": "all",         # all | sampled | followees
    "max_candidates": 1000,    # all: non-positive candidates per user (a fixed sample)
    "negatives_per_positive": 4,   # sampled: other images per held-out one
    "at": (1, 3, 5, 10),
    "select": "R@10",          # the metric that selects the best checkpoint (higher is better)
    "seed": 0,
}


def get_config() -> ml_collections.ConfigDict:
  config = du2mce.get_config()
  config.data.embedded.update(num_users=500, posts_per_user=40.0, image_size=32,
                              actions_per_user=40)
  config.data.interactions = {
      "test": 0.2,               # each user's most recent actions (< 1: a fraction, else a count)
      "validation": 0.1,         # the ones just before (0: no validation, no best checkpoint)
      "images_only": False,      # only actions on posts with an image (CDL)
      "order_by": "time",        # held-out actions: the most recent ones, or "random"
      "negatives": "random",     # time_window | random | followee
      "window_minutes": 60.0,    # time_window: negatives published within +- this
      "semantic_clusters": 0,    # k-means clusters of post texts (0: none)
  }
  config.model = ml_collections.ConfigDict({"name": "", "image_input": "pixels",
                                            "dtype": "float32"})
  config.loss = ml_collections.ConfigDict({"l2": 0.0})
  config.stages = ()
  config.batch_size = 256
  config.num_epochs = 10
  config.learning_rate = 1e-3
  config.lr_decay = 10.0
  config.lr_decay_epochs = 1000
  config.optimizer = "adam"
  config.momentum = 0.0
  config.weight_decay = 0.0
  config.log_every_steps = 20
  config.checkpoint_every_steps = 200
  config.evals = ml_collections.ConfigDict()
  config.evals.val = {**RECOMMENDATION, "split": "validation", "every_steps": 200}
  config.evals.test = {**RECOMMENDATION, "split": "test", "every_steps": 0}
  config.best = "val"
  return config
