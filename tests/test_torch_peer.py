"""Does the PyTorch peer of the throughput benchmark compute sempre-jax's step?

benchmarks/torch_peer.py is written independently of sempre-jax; from the same
parameters and batch (missing images and texts, shared users, a repeated text
and image) its embeddings and loss must equal sempre-jax's in float32, for
both loss directions. Skipped where torch (the optional [torch] extra) is absent.
"""

import os
import sys

import jax
import numpy as np
import pytest

from configs import du2mce as du2mce_config
from sempre_jax import losses
from sempre_jax.models import du2mce

torch = pytest.importorskip("torch")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import torch_peer  # noqa: E402  pylint: disable=wrong-import-position


def _batch(rng, size=12, length=7, users=5, vocab=40, features=16):
  lengths = rng.integers(0, length + 1, size)
  lengths[0] = 0                                                   # a post without text
  mask = np.arange(length)[None] < lengths[:, None]
  has_image = rng.random(size) < 0.6
  has_image[1:3] = True
  image_id = np.where(has_image, np.arange(size), -1)
  image_id[1] = image_id[2]                                        # a re-used image
  text_hash = rng.integers(1, 1000, size)
  text_hash[3] = text_hash[4]                                      # a repeated text
  return {"user": rng.integers(0, users, size).astype(np.int32),
          "tokens": np.where(mask, rng.integers(1, vocab, mask.shape), 0).astype(np.int32),
          "text_mask": mask, "image_mask": has_image,
          "text_hash": text_hash.astype(np.int32), "image_id": image_id.astype(np.int32),
          "image_features": rng.normal(size=(size, features)).astype(np.float32)}


@pytest.mark.parametrize("directions", ["one", "both"])
def test_peer_equals_sempre_jax(directions):
  config = du2mce_config.get_config()
  config.model.update(embed_dim=8, word_dim=6, user_dim=5, text_filters=(4, 3, 3))
  batch = _batch(np.random.default_rng(0))
  module = du2mce.build(config.model, {"num_users": 5, "vocab_size": 40})
  params = module.init(jax.random.key(0), batch)["params"]
  rng = np.random.default_rng(1)
  params = jax.tree.map(lambda p: p + 0.1 * rng.normal(size=p.shape).astype(np.float32), params)
  emb = module.apply({"params": params}, batch)
  loss, _ = losses.du2mce_loss(emb, batch, lambdas=(0.1, 0.45), margin=0.2, mining="all",
                               directions=directions)

  peer = torch_peer.DU2MCE(5, 40, 8, 6, 5, (2, 3, 4), (4, 3, 3), feature_dim=16)
  peer.load_flax(params)
  tbatch = torch_peer.to_torch(batch)
  with torch.no_grad():
    temb = {k: torch_peer.l2_normalize(v) for k, v in peer(tbatch).items()}
    tloss = torch_peer.du2mce_loss(temb, tbatch, lambdas=(0.1, 0.45), margin=0.2,
                                   directions=directions)
  for k in emb:
    np.testing.assert_allclose(temb[k].numpy(), emb[k], atol=1e-5)
  assert float(loss) > 0
  np.testing.assert_allclose(float(tloss), float(loss), rtol=1e-5)
