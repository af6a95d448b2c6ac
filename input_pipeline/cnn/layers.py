"""Which convolutions do the CNNs use, written to run fast on CPU as on accelerators?

XLA:CPU runs a grouped (depthwise) convolution 5-40x slower, and a 1x1
convolution about 2x slower, than the same arithmetic written as fused
multiply-adds or a matrix product; on GPU/TPU XLA lowers both forms alike.
Kernels keep nn.Conv's layout [kh, kw, in / groups, out], so PyTorch weights
map onto them as onto nn.Conv.
"""

import flax.linen as nn
import jax.numpy as jnp


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
  """TensorFlow's SAME: ceil(size / stride) outputs, the odd pixel at the end."""
  pad = max((-(-size // stride) - 1) * stride + kernel - size, 0)
  return pad // 2, pad - pad // 2


class Conv1x1(nn.Module):
  """1x1 convolution without bias: [B, H, W, C] -> [B, ceil(H / s), ceil(W / s), features]."""
  features: int
  stride: int = 1

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    kernel = self.param("kernel", nn.initializers.lecun_normal(),
                        (1, 1, x.shape[-1], self.features))
    return x[:, ::self.stride, ::self.stride] @ kernel[0, 0]


class DepthwiseConv(nn.Module):
  """Depthwise k x k convolution without bias, SAME padding: [B, H, W, C] ->
  [B, ceil(H / s), ceil(W / s), C], as k * k shifted multiply-adds."""
  kernel_size: int
  stride: int

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    k, s = self.kernel_size, self.stride
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (k, k, 1, x.shape[-1]))
    (top, bottom), (left, right) = (same_padding(n, k, s) for n in x.shape[1:3])
    oh, ow = -(-x.shape[1] // s), -(-x.shape[2] // s)
    x = jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
    out = 0.0
    for i in range(k):
      for j in range(k):
        out = out + x[:, i:i + (oh - 1) * s + 1:s, j:j + (ow - 1) * s + 1:s] * kernel[i, j, 0]
    return out
