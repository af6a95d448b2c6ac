"""What is being optimised, equation by equation?

DU2MCE (Sikka et al. 2019), with cosine similarity S (embeddings are
L2-normalised, so S(x, y) = x . y) and margin m, for the posts j of a batch
(text T_j, image I_j, user U_j):

  Eq. 1   L = l1 / N_TU * L_TU + l2 / N_IT * L_IT + (1 - l1 - l2) / N_IU * L_IU
  Eq. 2-3 L_TU = sum_j L_U-T(T_j, U_j),  L_IT = sum_j L_T-I(I_j, T_j),
          L_IU = sum_j L_U-I(I_j, U_j), over the posts j carrying both modalities
  Eq. 4   L_U-T(T_j, U_j) = sum_{n: U_n != U_j} [m - S(x_j^T, x_j^U) + S(x_j^T, x_n^U)]_+

Eq. 4 is one-directional: the anchor is the text and the negatives are the
users of the other posts; "the same formulation" gives L_T-I and L_U-I with
the image as the anchor. In TERMS each term is (anchor, positive) modality:
("text", "user"), ("image", "text"), ("image", "user").

`directions` selects:
  "one"   the paper: per positive pair (a, b), sum_{b-} [m - S(a, b) + S(a, b-)]_+.
  "both"  a named departure (VSE++, Faghri et al. 2018): also the reverse
          direction, + sum_{a-} [m - S(a, b) + S(a-, b)]_+ with the second
          modality as the anchor.

N_XY is the number of positive (x, y) pairs in the global batch: posts that carry
both modalities. Negatives are the other posts of the global batch, one per post
(a user with two other posts in the batch is two negatives) ("all", Eq. 4), or
only the hardest one per anchor and direction ("hardest", VSE++). A candidate
that shares the anchor's text hash, image id or user (for the two modalities of
the term) is an accidental hit, never a negative. A term with no positive pair
contributes 0.

The loss is written per device: each device holds its local anchors [b, D] and
sees the candidates of the whole global batch [G, D] through an all-gather over
`axis_name` (None: a single device, local = global). Each term computes one
similarity block S = a_local @ b_global^T [b, G]; for "both", the reverse
direction's rows, b_local . a_global, are the transposed columns of the global
matrix, which an all-to-all brings home instead of a second matmul. For large
global batches, `candidate_chunk` instead scans the candidates in chunks (each
recomputed in the backward pass), so memory per device is O(b x chunk) rather
than O(b x G).
"""

from collections.abc import Mapping

import jax
import jax.numpy as jnp

TERMS = {"tu": ("text", "user"), "it": ("image", "text"), "iu": ("image", "user")}
IDENTITY_KEY = {"text": "text_hash", "image": "image_id", "user": "user"}
MINING = ("all", "hardest")
DIRECTIONS = ("one", "both")


def term_weights(l1: float, l2: float) -> dict[str, float]:
  """(l1, l2) -> weights of the TU, IT, IU terms (Eq. 1), validated."""
  if not (0 <= l1 <= 1 and 0 <= l2 <= 1 and l1 + l2 <= 1 + 1e-9):
    raise ValueError(f"loss weights need l1, l2 in [0, 1] and l1 + l2 <= 1; "
                     f"got l1={l1}, l2={l2}")
  return {"tu": l1, "it": l2, "iu": max(0.0, 1.0 - l1 - l2)}


def presence(batch: Mapping[str, jnp.ndarray]) -> dict[str, jnp.ndarray]:
  """Which modalities each post carries: {modality: [B] bool}."""
  return {"text": batch["text_mask"].any(axis=-1),
          "image": batch["image_mask"].astype(bool),
          "user": jnp.ones(batch["user"].shape, bool)}


def hinge(sim, pos, anchor_valid, neg_valid, margin: float, mining: str) -> jnp.ndarray:
  """One direction of Eq. 4 per anchor.

  sim: [b, G] similarities of each anchor to all candidates; pos: [b] its
  positive's similarity; anchor_valid: [b]; neg_valid: [b, G]. Returns [b]: sum
  (or max) over valid negatives of [m - S(a, p) + S(a, c)]_+, zero for invalid anchors.
  """
  cost = jnp.where(neg_valid, jax.nn.relu(margin - pos[:, None] + sim), 0.0)
  per_anchor = cost.sum(axis=-1) if mining == "all" else cost.max(axis=-1)
  return jnp.where(anchor_valid, per_anchor, 0.0)


def not_hit(own_keys, cand_keys) -> jnp.ndarray:
  """[b, G]: candidate j shares no identity key with anchor i."""
  out = True
  for own, cand in zip(own_keys, cand_keys):
    out = out & (own[:, None] != cand[None, :])
  return out


def chunked_hinge(anchors, pos, anchor_valid, cands, cand_has, own_keys, cand_keys,
                  margin: float, mining: str, chunk: int) -> jnp.ndarray:
  """`hinge` of anchors [b, D] against cands [G, D] in chunks of `chunk`: [b]."""
  num = cands.shape[0]
  if num % chunk:
    raise ValueError(f"loss.candidate_chunk={chunk} must divide the global batch {num}")
  split = lambda x: x.reshape((num // chunk, chunk) + x.shape[1:])

  @jax.checkpoint
  def block(cands, cand_has, cand_keys):
    ok = cand_has[None, :] & not_hit(own_keys, cand_keys)
    return hinge(anchors @ cands.T, pos, anchor_valid, ok, margin, mining)

  def body(acc, xs):
    part = block(*xs)
    return (acc + part if mining == "all" else jnp.maximum(acc, part)), None

  init = jnp.zeros_like(pos)                 # [b], varying like the anchors
  acc, _ = jax.lax.scan(body, init, (split(cands), split(cand_has),
                                     tuple(split(k) for k in cand_keys)))
  return acc


def du2mce_loss(emb: Mapping[str, jnp.ndarray], batch: Mapping[str, jnp.ndarray], *,
                lambdas: tuple[float, float], margin: float, mining: str,
                directions: str = "one", axis_name: str | None = None,
                candidate_chunk: int = 0, content_of_posts: bool = False):
  """Eq. 1 for the local anchors, negatives from the global batch.

  emb: {"text", "image", "user"} -> [b, D] local embeddings; batch: the local
  batch (needs tokens' text_mask, image_mask, user, text_hash, image_id);
  directions: "one" (Eq. 4, the first modality of each term is the anchor)
  or "both" (also the reverse direction);
  candidate_chunk: 0, or the chunk size of the candidate scan;
  content_of_posts: emb["text"] is the post's merged content (Merged-Modality
  baseline), present when the post has a text or an image.
  Returns (loss, metrics): the local share of the global loss (summing it over
  devices gives Eq. 1) and psum'ed sums/counts per term.
  """
  if mining not in MINING:
    raise ValueError(f"loss.mining must be one of {MINING}, got {mining!r}")
  if directions not in DIRECTIONS:
    raise ValueError(f"loss.directions must be one of {DIRECTIONS}, got {directions!r}")
  both = directions == "both"
  weights = term_weights(*lambdas)
  if axis_name is None:
    gather = lambda x: x
    psum = lambda x: x
    columns = lambda sim: sim.T
  else:
    gather = lambda x: jax.lax.all_gather(x, axis_name, tiled=True)
    psum = lambda x: jax.lax.psum(x, axis_name)
    # [b, G] row blocks -> this device's [G, b] column block of the global matrix.
    columns = lambda sim: jax.lax.all_to_all(
        sim, axis_name, split_axis=1, concat_axis=0, tiled=True).T

  has = presence(batch)
  if content_of_posts:
    has["text"] = has["text"] | has["image"]
  keys = {m: batch[IDENTITY_KEY[m]] for m in IDENTITY_KEY}
  # Candidates: the positives' modality; with "both" in chunks, the anchors' too.
  gathered = emb if candidate_chunk and both else dict.fromkeys(b for _, b in TERMS.values())
  g_emb = {m: gather(emb[m]) for m in gathered}
  g_has = {m: gather(h) for m, h in has.items()}
  g_keys = {m: gather(k) for m, k in keys.items()}

  loss, metrics = 0.0, {}
  for term, (a, b) in TERMS.items():
    valid = has[a] & has[b]
    pos = jnp.sum(emb[a] * emb[b], axis=-1)
    own, cand = (keys[a], keys[b]), (g_keys[a], g_keys[b])
    if candidate_chunk:
      total = chunked_hinge(emb[a], pos, valid, g_emb[b], g_has[b], own, cand,
                            margin, mining, candidate_chunk)
      if both:
        total += chunked_hinge(emb[b], pos, valid, g_emb[a], g_has[a], own, cand,
                               margin, mining, candidate_chunk)
    else:
      ok = not_hit(own, cand)
      sim = emb[a] @ g_emb[b].T                        # [b, G]: a_i . b_j
      total = hinge(sim, pos, valid, ok & g_has[b][None, :], margin, mining)
      if both:
        total += hinge(columns(sim), pos, valid, ok & g_has[a][None, :], margin, mining)
    total = total.sum()
    pairs = psum(valid.sum())
    loss += weights[term] * total / jnp.maximum(pairs, 1)
    metrics[f"{term}_loss_sum"] = psum(total)
    metrics[f"{term}_pairs"] = pairs
  metrics["loss"] = psum(loss)
  return loss, metrics
