"""How fast is the same DU2MCE train step written plainly in PyTorch?

The peer of sempre-jax's DU2MCE features step that benchmarks/throughput.py
--peer=torch times beside it: Kim's CNN text tower (word table, 1-D
convolutions with ReLU, max over the positions that start inside the text,
Dense), the frozen-feature image tower (Dense F -> D), the user tower (table,
Dense), each output L2-normalised in float32; the pairwise hinge loss of
sempre_jax/losses.py with mining "all" (Eq. 1-4 of Sikka et al. 2019:
sum over in-batch negatives, accidental hits and missing modalities masked);
Adam. With `bfloat16=True` the towers run under autocast (CPU or CUDA, where the
model lives) and the loss stays float32, the same split as sempre-jax's
model.dtype=bfloat16. Parameters can be
copied from a sempre-jax parameter tree, so both compute the same loss on one
batch. torch is an optional extra: pip install -e ".[torch]".
"""

from collections.abc import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

TERMS = {"tu": ("text", "user"), "it": ("image", "text"), "iu": ("image", "user")}
IDENTITY_KEY = {"text": "text_hash", "image": "image_id", "user": "user"}
DIRECTIONS = ("one", "both")


def l2_normalize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
  """x / sqrt(||x||^2 + eps) along the last axis, in float32."""
  x = x.float()
  return x / torch.sqrt((x * x).sum(-1, keepdim=True) + eps)


class DU2MCE(nn.Module):
  """Text, image-feature and user towers: batch -> {modality: [B, D]} (not yet normalised)."""

  def __init__(self, num_users: int, vocab_size: int, embed_dim: int = 1024,
               word_dim: int = 300, user_dim: int = 300, widths=(2, 3, 4),
               filters=(512, 256, 256), feature_dim: int = 2048):
    super().__init__()
    self.widths = tuple(widths)
    self.word_embed = nn.Embedding(vocab_size, word_dim)
    self.convs = nn.ModuleList(nn.Conv1d(word_dim, n, w) for w, n in zip(widths, filters))
    self.text_proj = nn.Linear(sum(filters), embed_dim)
    self.image_proj = nn.Linear(feature_dim, embed_dim)
    self.user_embed = nn.Embedding(num_users, user_dim)
    self.user_proj = nn.Linear(user_dim, embed_dim)

  def forward(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    mask = batch["text_mask"]                                          # [B, L] bool
    x = (self.word_embed(batch["tokens"]) * mask[..., None]).transpose(1, 2)   # [B, E, L]
    pooled = []
    for width, conv in zip(self.widths, self.convs):
      h = F.relu(conv(F.pad(x, (0, width - 1))))                      # [B, n, L]
      h = h.masked_fill(~mask[:, None, :], float("-inf")).amax(dim=2)
      pooled.append(torch.where(torch.isfinite(h), h, 0.0))            # empty texts -> 0
    return {"text": self.text_proj(torch.cat(pooled, dim=1)),
            "image": self.image_proj(batch["image_features"]),
            "user": self.user_proj(self.user_embed(batch["user"]))}

  @torch.no_grad()
  def load_flax(self, params: Mapping) -> "DU2MCE":
    """Copies a sempre-jax DU2MCE parameter tree (features mode) into this model."""
    t = lambda a: torch.from_numpy(np.array(a, np.float32))
    self.word_embed.weight.copy_(t(params["text"]["word_embed"]["embedding"]))
    for width, conv in zip(self.widths, self.convs):
      conv.weight.copy_(t(params["text"][f"conv{width}"]["kernel"]).permute(2, 1, 0))
      conv.bias.copy_(t(params["text"][f"conv{width}"]["bias"]))
    self.user_embed.weight.copy_(t(params["user"]["user_embed"]["embedding"]))
    for tower, linear in (("text", self.text_proj), ("image", self.image_proj),
                          ("user", self.user_proj)):
      linear.weight.copy_(t(params[tower]["proj"]["kernel"]).T)
      linear.bias.copy_(t(params[tower]["proj"]["bias"]))
    return self


def hinge(sim, pos, anchor_valid, neg_valid, margin: float) -> torch.Tensor:
  """[b]: sum over valid negatives c of [m - S(a, p) + S(a, c)]_+, 0 for invalid anchors."""
  cost = torch.where(neg_valid, F.relu(margin - pos[:, None] + sim), 0.0)
  return torch.where(anchor_valid, cost.sum(-1), 0.0)


def du2mce_loss(emb: Mapping[str, torch.Tensor], batch: Mapping[str, torch.Tensor], *,
                lambdas=(0.1, 0.45), margin: float = 0.2, directions: str = "one"):
  """Eq. 1 over the batch, negatives from the batch; emb: normalised [B, D] per modality.

  directions "one": anchors of a term's first modality against candidates of
  its second (the paper's hinge); "both": also the reverse.
  """
  if directions not in DIRECTIONS:
    raise ValueError(f"directions must be one of {DIRECTIONS}, got {directions!r}")
  l1, l2 = lambdas
  weights = {"tu": l1, "it": l2, "iu": max(0.0, 1.0 - l1 - l2)}
  has = {"text": batch["text_mask"].any(-1), "image": batch["image_mask"],
         "user": torch.ones_like(batch["image_mask"])}
  keys = {m: batch[k] for m, k in IDENTITY_KEY.items()}
  loss = 0.0
  for term, (a, b) in TERMS.items():
    valid = has[a] & has[b]
    pos = (emb[a] * emb[b]).sum(-1)
    ok = ((keys[a][:, None] != keys[a][None, :]) & (keys[b][:, None] != keys[b][None, :]))
    sim = emb[a] @ emb[b].T                                            # [B, B]: a_i . b_j
    total = hinge(sim, pos, valid, ok & has[b][None, :], margin).sum()
    if directions == "both":
      total = total + hinge(sim.T, pos, valid, ok & has[a][None, :], margin).sum()
    loss = loss + weights[term] * total / valid.sum().clamp(min=1)
  return loss


def to_torch(batch: Mapping[str, np.ndarray], device: str = "cpu") -> dict[str, torch.Tensor]:
  """A numpy batch of sempre-jax's layout -> torch tensors on `device` (masks as bool)."""
  out = {k: torch.from_numpy(np.asarray(v)).to(device) for k, v in batch.items()}
  out["text_mask"], out["image_mask"] = out["text_mask"].bool(), out["image_mask"].bool()
  return out


class Trainer:
  """One model, its Adam and a step: eager or torch.compile'd, float32 or
  bfloat16 autocast towers (float32 loss)."""

  def __init__(self, model: DU2MCE, *, learning_rate: float = 5e-4, lambdas=(0.1, 0.45),
               margin: float = 0.2, directions: str = "one", bfloat16: bool = False,
               compile: bool = False):
    self.model = model
    self.device_type = next(model.parameters()).device.type     # "cpu" or "cuda"
    self.opt = torch.optim.Adam(model.parameters(), lr=learning_rate)
    self.bfloat16 = bfloat16
    self.loss_args = {"lambdas": lambdas, "margin": margin, "directions": directions}
    self.loss = torch.compile(self._loss) if compile else self._loss

  def _loss(self, batch):
    with torch.autocast(self.device_type, dtype=torch.bfloat16, enabled=self.bfloat16):
      raw = self.model(batch)
    emb = {k: l2_normalize(v) for k, v in raw.items()}
    return du2mce_loss(emb, batch, **self.loss_args)

  def step(self, batch) -> torch.Tensor:
    """One Adam step on `batch`; returns the loss before the update (not synchronised)."""
    self.opt.zero_grad(set_to_none=True)
    loss = self.loss(batch)
    loss.backward()
    self.opt.step()
    return loss.detach()
