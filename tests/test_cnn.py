"""Frozen ImageNet CNNs: weights read without running pickled code, EfficientNet-Lite0
recognising real photos and matching an independent PyTorch forward pass, the
torchvision ResNet mapping on random weights, features keyed for prepare."""

import collections
import json
import os
import pickle
import struct
import sys
import zipfile

import jax
import numpy as np
import pytest
import skimage.data
from PIL import Image

from input_pipeline import loader, prepare, records
from input_pipeline.cnn import efficientnet_lite, features, layers, resnet, weights

TWEET_IMAGES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..",
                            "shared", "data", "mediaeval2016", "images")

CATS = {281, 282, 283, 284, 285}          # tabby, tiger cat, Persian, Siamese, Egyptian cat
COFFEE = {967, 968, 504}                  # espresso, cup, coffee mug
ROCKET = {657, 744, 812}                  # missile, projectile, space shuttle
MOTORBIKE = {665, 670}                    # moped, motor scooter
# Strides of EfficientNet-Lite0's 16 blocks (TensorFlow's block strings, stated here apart
# from the module's stage table).
LITE0_STRIDES = [1, 2, 1, 2, 1, 2, 1, 1, 1, 1, 1, 2, 1, 1, 1, 1]


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
  monkeypatch.setenv("SEMPRE_JAX_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  """A corpus folder: images/ with four photos of known subjects and a corrupt file."""
  root = tmp_path_factory.mktemp("corpus")
  (root / "images").mkdir()
  Image.fromarray(skimage.data.chelsea()).save(root / "images" / "chelsea.png")
  Image.fromarray(skimage.data.coffee()).save(root / "images" / "coffee.jpg", quality=90)
  Image.fromarray(skimage.data.rocket()).save(root / "images" / "rocket.jpg", quality=90)
  Image.fromarray(skimage.data.stereo_motorcycle()[0]).save(root / "images" / "motorbike.png")
  (root / "images" / "corrupt.jpg").write_bytes(b"not an image")
  return root


SUBJECTS = {"chelsea.png": CATS, "coffee.jpg": COFFEE, "rocket.jpg": ROCKET,
            "motorbike.png": MOTORBIKE}


@pytest.fixture(scope="module")
def photos(corpus):
  """uint8 [4, 224, 224, 3], preprocessed as for EfficientNet-Lite0, in SUBJECTS order."""
  return np.stack([features.load_pixels(str(corpus / "images" / f)) for f in SUBJECTS])


@pytest.fixture(scope="module")
def lite0():
  """(model, variables, jitted logits of uint8 pixels [B, H, W, 3])."""
  model, variables = efficientnet_lite.load()
  return model, variables, jax.jit(lambda x: model.apply(variables, x))


# ------------------------------------------------------------ safe reading ---

def _str(s):
  b = s.encode()
  return b"X" + struct.pack("<I", len(b)) + b


def _int(i):
  return b"J" + struct.pack("<i", i)


def _tuple(*items):
  return b"(" + b"".join(items) + b"t"


def _torch_zip(path, numel, offset, size, stride, first=0):
  """A torch.save-style zip archive of {'w': tensor}, the pickle written opcode by
  opcode (storage '0' holds float32 first, first + 1, ..., first + numel - 1)."""
  storage = _tuple(_str("storage"), b"ctorch\nFloatStorage\n", _str("0"), _str("cpu"),
                   _int(numel)) + b"Q"
  tensor = (b"ctorch._utils\n_rebuild_tensor_v2\n"
            + _tuple(storage, _int(offset), _tuple(*map(_int, size)),
                     _tuple(*map(_int, stride)), b"\x89", b"ccollections\nOrderedDict\n)R")
            + b"R")
  with zipfile.ZipFile(path, "w") as z:
    z.writestr("archive/data.pkl", b"\x80\x02}" + _str("w") + tensor + b"s.")
    z.writestr("archive/data/0", np.arange(first, first + numel, dtype=np.float32).tobytes())


def test_tensors_follow_torch_storage_offset_and_strides(tmp_path):
  # Element [i, j] of a tensor is storage[offset + i * stride[0] + j * stride[1]].
  _torch_zip(tmp_path / "w.pth", 12, 2, (3, 2), (1, 4))
  np.testing.assert_array_equal(weights.read_torch(str(tmp_path / "w.pth"))["w"],
                                [[2, 6], [3, 7], [4, 8]])
  _torch_zip(tmp_path / "out.pth", 12, 2, (3, 4), (1, 4))   # would read element 16 of 12
  with pytest.raises(ValueError, match="outside its storage"):
    weights.read_torch(str(tmp_path / "out.pth"))


class _Evil:
  def __init__(self, path):
    self.path = path

  def __reduce__(self):
    return open, (self.path, "w")


def test_pickled_code_is_refused_not_run(tmp_path):
  victim = str(tmp_path / "pwned")
  evil = pickle.dumps({"w": _Evil(victim)}, protocol=2)
  with zipfile.ZipFile(tmp_path / "evil_zip.pth", "w") as z:
    z.writestr("archive/data.pkl", evil)
  legacy = b"".join(pickle.dumps(x, protocol=2)
                    for x in (weights.LEGACY_MAGIC, 1001, {"little_endian": True})) + evil
  (tmp_path / "evil_legacy.pth").write_bytes(legacy)
  for name in ("evil_zip.pth", "evil_legacy.pth"):
    with pytest.raises(weights.UnsafePickleError, match="refusing to load"):
      weights.read_torch(str(tmp_path / name))
  assert not os.path.exists(victim)


def test_torch_pickles_are_converted_once_and_cached(tmp_path, monkeypatch):
  monkeypatch.setenv("SEMPRE_JAX_CACHE", str(tmp_path / "cache"))
  path = str(tmp_path / "w.pth")
  _torch_zip(path, 4, 0, (4,), (1,))
  np.testing.assert_array_equal(weights.read_state_dict(path)["w"], [0, 1, 2, 3])
  assert len(os.listdir(tmp_path / "cache")) == 1
  stat = os.stat(path)
  _torch_zip(path, 4, 0, (4,), (1,), first=10)   # same size and mtime: the cache answers
  os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
  np.testing.assert_array_equal(weights.read_state_dict(path)["w"], [0, 1, 2, 3])
  os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))   # a newer file: re-read
  np.testing.assert_array_equal(weights.read_state_dict(path)["w"], [10, 11, 12, 13])


def test_reader_matches_torch_load_on_every_format(tmp_path):
  torch = pytest.importorskip("torch")
  base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
  state = collections.OrderedDict(
      matrix=base, view=base[1:, 2:].t(), half=torch.randn(5).half(),
      bf16=torch.randn(3, 2).bfloat16(), ints=torch.arange(7), flags=torch.tensor([True, False]),
      scalar=torch.tensor(3.5))
  for legacy in (False, True):
    path = str(tmp_path / f"w{legacy}.pth")
    torch.save(state, path, _use_new_zipfile_serialization=not legacy)
    ours, ref = weights.read_torch(path), torch.load(path, weights_only=True)
    assert ours.keys() == ref.keys()
    for k in ref:
      want = ref[k].float().numpy() if k == "bf16" else ref[k].numpy()
      np.testing.assert_array_equal(ours[k].astype(want.dtype), want, err_msg=k)
      assert ours[k].shape == want.shape
  shipped = efficientnet_lite.weights_file()
  ref = torch.load(shipped, weights_only=True)
  ours = weights.read_torch(shipped)
  assert all(np.array_equal(ours[k], ref[k].numpy()) for k in ref) and ours.keys() == ref.keys()


# ----------------------------------------------------------- EfficientNet ----

def test_efficientnet_recognises_real_photos(lite0, photos):
  top5 = np.argsort(-np.asarray(lite0[2](photos)), axis=1)[:, :5]
  for name, expected, top in zip(SUBJECTS, SUBJECTS.values(), top5):
    assert expected & set(top.tolist()), f"{name}: top-5 {top.tolist()}"


def test_input_scaling_matches_the_stem_batch_norm_statistics(lite0, photos):
  """The stem's running variance (ImageNet under the training scaling) fits real
  photos under the module's (x - 127) / 128, not under ImageNet mean/std."""
  variables = lite0[1]
  kernel = variables["params"]["_conv_stem"]["kernel"]
  var = variables["batch_stats"]["_bn0"]["var"]
  live = var > 1e-3

  def stem_variance_ratio(mean, std):
    x = ((photos - np.asarray(mean)) / np.asarray(std)).astype(np.float32)
    out = jax.lax.conv_general_dilated(x, kernel, (2, 2), "SAME",
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return np.median(np.asarray(out).var(axis=(0, 1, 2))[live] / var[live])

  assert 0.5 < stem_variance_ratio(efficientnet_lite.MEAN_RGB, efficientnet_lite.STDDEV_RGB) < 2
  imagenet = 255 * np.array([0.485, 0.456, 0.406]), 255 * np.array([0.229, 0.224, 0.225])
  assert stem_variance_ratio(*imagenet) > 2   # 3.6: the check tells the two apart


def test_weights_expect_tensorflow_same_padding(lite0, monkeypatch):
  """Over 64 real tweet photos, predictions are surer (lower entropy, by 0.3 nats)
  with TensorFlow's SAME padding than with PyTorch's symmetric k // 2 padding."""
  if not os.path.isdir(TWEET_IMAGES):
    pytest.skip(f"real data not found at {TWEET_IMAGES}")
  model, variables, logits = lite0
  pixels = np.stack([features.load_pixels(p)
                     for p in sorted(features.image_files(TWEET_IMAGES).values())[:64]])

  def entropy(logits):
    p = np.asarray(jax.nn.softmax(logits))
    return np.mean(-np.sum(p * np.log(p + 1e-12), axis=1))

  same = entropy(np.concatenate([logits(pixels[i:i + 4]) for i in range(0, 64, 4)]))
  monkeypatch.setattr(layers, "same_padding", lambda size, kernel, stride: (kernel // 2,) * 2)
  symmetric = entropy(jax.jit(lambda x: model.apply(variables, x))(pixels))
  assert same < symmetric - 0.15, (same, symmetric)


def _same_conv(torch, x, w, stride, groups=1):
  """TensorFlow's SAME: ceil(n / stride) outputs, the odd padding at the end."""
  pads = []
  for n, k in ((x.shape[3], w.shape[3]), (x.shape[2], w.shape[2])):
    p = max((-(-n // stride) - 1) * stride + k - n, 0)
    pads += [p // 2, p - p // 2]
  return torch.nn.functional.conv2d(torch.nn.functional.pad(x, pads), w, stride=stride,
                                    groups=groups)


def _torch_efficientnet_lite0(torch, sd, x):
  """A plain PyTorch EfficientNet-Lite0: x [B, 3, H, W] already scaled -> logits."""
  f = torch.nn.functional

  def bn(x, p):
    return f.batch_norm(x, sd[f"{p}.running_mean"], sd[f"{p}.running_var"], sd[f"{p}.weight"],
                        sd[f"{p}.bias"], False, 0.0, 1e-3)

  x = f.relu6(bn(_same_conv(torch, x, sd["_conv_stem.weight"], 2), "_bn0"))
  for i, stride in enumerate(LITE0_STRIDES):
    p, inputs = f"_blocks.{i}", x
    if f"{p}._expand_conv.weight" in sd:
      x = f.relu6(bn(f.conv2d(x, sd[f"{p}._expand_conv.weight"]), f"{p}._bn0"))
    w = sd[f"{p}._depthwise_conv.weight"]
    x = f.relu6(bn(_same_conv(torch, x, w, stride, groups=w.shape[0]), f"{p}._bn1"))
    x = bn(f.conv2d(x, sd[f"{p}._project_conv.weight"]), f"{p}._bn2")
    if x.shape == inputs.shape:
      x = x + inputs
  x = f.relu6(bn(f.conv2d(x, sd["_conv_head.weight"]), "_bn1")).mean(dim=(2, 3))
  return f.linear(x, sd["_fc.weight"], sd["_fc.bias"])


def test_efficientnet_matches_an_independent_pytorch_forward_pass(lite0, photos):
  torch = pytest.importorskip("torch")
  sd = torch.load(efficientnet_lite.weights_file(), weights_only=True)
  x = torch.from_numpy(((photos.astype(np.float32) - 127) / 128).transpose(0, 3, 1, 2))
  with torch.no_grad():
    ref = _torch_efficientnet_lite0(torch, sd, x).numpy()
  np.testing.assert_allclose(np.asarray(lite0[2](photos)), ref, atol=1e-4, rtol=1e-5)


# ----------------------------------------------------------------- ResNet ----

BLOCKS = (2, 1, 1, 1)


def _random_resnet_state(blocks, num_classes, seed=0):
  """A torchvision-named Bottleneck ResNet state dict with random weights and statistics."""
  rng = np.random.default_rng(seed)
  sd = {}

  def conv(name, o, i, k):
    sd[f"{name}.weight"] = (rng.normal(size=(o, i, k, k)) * np.sqrt(2 / (i * k * k))).astype(
        np.float32)

  def bn(name, c, gain=1.0):
    sd.update({f"{name}.weight": rng.uniform(0.5, 1.5, c).astype(np.float32) * gain,
               f"{name}.bias": rng.normal(0, 0.1, c).astype(np.float32),
               f"{name}.running_mean": rng.normal(0, 0.1, c).astype(np.float32),
               f"{name}.running_var": rng.uniform(0.5, 2, c).astype(np.float32),
               f"{name}.num_batches_tracked": np.array(100, np.int64)})

  conv("conv1", 64, 3, 7)
  bn("bn1", 64)
  c = 64
  for s, (n, width) in enumerate(zip(blocks, (64, 128, 256, 512))):
    for i in range(n):
      p = f"layer{s + 1}.{i}"
      conv(f"{p}.conv1", width, c, 1), bn(f"{p}.bn1", width)
      conv(f"{p}.conv2", width, width, 3), bn(f"{p}.bn2", width)
      conv(f"{p}.conv3", 4 * width, width, 1), bn(f"{p}.bn3", 4 * width, gain=0.2)
      if i == 0:
        conv(f"{p}.downsample.0", 4 * width, c, 1), bn(f"{p}.downsample.1", 4 * width)
      c = 4 * width
  sd["fc.weight"] = rng.normal(0, 0.05, (num_classes, c)).astype(np.float32)
  sd["fc.bias"] = rng.normal(0, 0.1, num_classes).astype(np.float32)
  return sd


def test_resnet_key_mapping_and_pooled_size(tmp_path):
  import safetensors.numpy
  sd = _random_resnet_state(BLOCKS, 10)
  safetensors.numpy.save_file(sd, str(tmp_path / "r.safetensors"))
  np.savez(tmp_path / "r.npz", **sd)
  for name in ("r.safetensors", "r.npz"):
    model, variables = resnet.load(str(tmp_path / name))
    assert model.blocks == BLOCKS and model.num_classes == 10
    params, stats = variables["params"], variables["batch_stats"]
    np.testing.assert_array_equal(params["layer1_1"]["conv2"]["kernel"],
                                  sd["layer1.1.conv2.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(params["layer3_0"]["downsample_0"]["kernel"][0, 0],
                                  sd["layer3.0.downsample.0.weight"][:, :, 0, 0].T)
    np.testing.assert_array_equal(params["layer2_0"]["bn3"]["scale"], sd["layer2.0.bn3.weight"])
    np.testing.assert_array_equal(stats["layer4_0"]["downsample_1"]["var"],
                                  sd["layer4.0.downsample.1.running_var"])
    np.testing.assert_array_equal(params["fc"]["kernel"], sd["fc.weight"].T)
    pooled = jax.eval_shape(lambda x: model.apply(variables, x, pooled=True),
                            np.zeros((2, 224, 224, 3), np.uint8))
    assert pooled.shape == (2, 2048)
  del sd["layer2.0.bn1.running_var"]
  np.savez(tmp_path / "broken.npz", **sd)
  with pytest.raises(ValueError, match="do not fit the network"):
    resnet.load(str(tmp_path / "broken.npz"))
  with pytest.raises(ValueError, match=r"not ResNet-152 \(3, 8, 36, 3\)"):
    features.load_encoder(f"resnet152:{tmp_path / 'r.npz'}")


def _torch_resnet(torch, sd, x, blocks):
  """A plain PyTorch torchvision-style ResNet: x [B, 3, H, W] already scaled ->
  (pooled [B, 2048], logits)."""
  f = torch.nn.functional

  def bn(x, p):
    return f.batch_norm(x, sd[f"{p}.running_mean"], sd[f"{p}.running_var"], sd[f"{p}.weight"],
                        sd[f"{p}.bias"], False, 0.0, 1e-5)

  x = f.relu(bn(f.conv2d(x, sd["conv1.weight"], stride=2, padding=3), "bn1"))
  x = f.max_pool2d(x, 3, stride=2, padding=1)
  for s, n in enumerate(blocks):
    for i in range(n):
      p, stride = f"layer{s + 1}.{i}", 2 if i == 0 and s > 0 else 1
      y = f.relu(bn(f.conv2d(x, sd[f"{p}.conv1.weight"]), f"{p}.bn1"))
      y = f.relu(bn(f.conv2d(y, sd[f"{p}.conv2.weight"], stride=stride, padding=1), f"{p}.bn2"))
      y = bn(f.conv2d(y, sd[f"{p}.conv3.weight"]), f"{p}.bn3")
      if f"{p}.downsample.0.weight" in sd:
        x = bn(f.conv2d(x, sd[f"{p}.downsample.0.weight"], stride=stride), f"{p}.downsample.1")
      x = f.relu(x + y)
  pooled = x.mean(dim=(2, 3))
  return pooled, f.linear(pooled, sd["fc.weight"], sd["fc.bias"])


def test_resnet_features_match_an_independent_pytorch_forward_pass(tmp_path, corpus):
  torch = pytest.importorskip("torch")
  sd = {k: torch.from_numpy(v) for k, v in _random_resnet_state(BLOCKS, 10).items()}
  files = {f: str(corpus / "images" / f) for f in SUBJECTS}
  pixels = np.stack([features.load_pixels(p, Image.BILINEAR) for p in files.values()])
  mean, std = 255 * np.array([0.485, 0.456, 0.406]), 255 * np.array([0.229, 0.224, 0.225])
  x = torch.from_numpy(((pixels - mean) / std).astype(np.float32).transpose(0, 3, 1, 2))
  with torch.no_grad():
    ref_pooled, ref_logits = (t.numpy() for t in _torch_resnet(torch, sd, x, BLOCKS))
  assert np.abs(ref_logits).max() > 0.1   # the comparison is not between near-zero logits
  loaded = []
  for legacy in (False, True):
    path = str(tmp_path / f"r{legacy}.pth")
    torch.save(sd, path, _use_new_zipfile_serialization=not legacy)
    loaded.append(resnet.load(path))
  jax.tree.map(np.testing.assert_array_equal, loaded[0][1], loaded[1][1])
  model, variables = loaded[0]
  encoder = features.Encoder("resnet", model, variables, 2048, Image.BILINEAR)
  got = features.extract_features(files, encoder, batch_size=4, progress=False)
  pooled = np.stack([got[f] for f in files])
  np.testing.assert_allclose(pooled, ref_pooled, atol=1e-4, rtol=1e-5)
  fc = variables["params"]["fc"]
  np.testing.assert_allclose(pooled @ fc["kernel"] + fc["bias"], ref_logits, atol=1e-4, rtol=1e-5)


# ------------------------------------------------------ feature extraction ---

def test_encoder_specs():
  assert features.parse_spec("efficientnet_lite0") == ("efficientnet_lite0", None)
  assert features.parse_spec("resnet152:/w/r.pth") == ("resnet152", "/w/r.pth")
  assert features.load_encoder("none") is None
  for bad in ("resnet152", "vgg16", "none:x", "efficientnet_lite0:x"):
    with pytest.raises(ValueError, match="image encoder must be one of"):
      features.parse_spec(bad)
  with pytest.raises(ValueError, match="extracts no features"):
    features.extract_features({}, "none")


def test_features_are_keyed_for_prepare_and_classify_their_photo(corpus, lite0, tmp_path,
                                                                  capsys):
  variables = lite0[1]
  files = features.image_files(str(corpus))
  assert sorted(files) == sorted(f"images/{f}" for f in [*SUBJECTS, "corrupt.jpg"])
  out = str(tmp_path / "feats.npz")
  # Batches of 4 on 4 devices: 5 images -> 2 batches, the second one padded.
  got = features.extract_features(files, "efficientnet_lite0", out, batch_size=3, workers=2)
  assert "unreadable" in capsys.readouterr().err
  saved = np.load(out)
  assert sorted(saved.files) == sorted(got) == sorted(f"images/{f}" for f in SUBJECTS)
  for name, expected in SUBJECTS.items():
    # prepare finds an image by its path as written in the posts
    key = prepare._feature_key(saved.files, f"images/{name}")
    assert key == f"images/{name}" and saved[key].shape == (efficientnet_lite.HEAD,)
    fc = variables["params"]["_fc"]
    logits = saved[key] @ fc["kernel"] + fc["bias"]
    assert expected & set(np.argsort(-logits)[:5].tolist()), name


def test_prepare_with_an_image_encoder_stores_the_photos_features(corpus, lite0, tmp_path):
  """prepare_data --image_encoder=efficientnet_lite0: each post's record holds the
  pooled features of its photo, which still classify the photo's subject."""
  variables = lite0[1]
  lines = [json.dumps({"post_id": f"p{i}", "user_id": f"u{i % 2}",
                       "text": "a photo of something", "image": f"images/{name}"})
           for i, name in enumerate(SUBJECTS)]
  posts = corpus / "posts.jsonl"
  posts.write_text("\n".join(lines) + "\n")
  out = str(tmp_path / "data")
  report = prepare.prepare(str(posts), out, prepare.Options(
      image_encoder="efficientnet_lite0", test_fraction=0.0, validation_fraction=0.0,
      min_count=1, word2vec_dim=0, workers=1), log=lambda *a: None)
  assert report["feature_dim"] == efficientnet_lite.HEAD
  meta = records.read_metadata(out)
  batch = next(loader.eval_batches(out, meta, "train", 8, "features"))
  fc = variables["params"]["_fc"]
  subject = {f"p{i}": SUBJECTS[name] for i, name in enumerate(SUBJECTS)}
  assert len(batch["post_id"]) == len(SUBJECTS) and batch["image_mask"].all()
  for post_id, vector in zip(batch["post_id"], batch["image_features"]):
    logits = vector @ fc["kernel"] + fc["bias"]
    assert subject[post_id.decode()] & set(np.argsort(-logits)[:5].tolist()), post_id
  with pytest.raises(prepare.PrepareError, match="--image_encoder"):
    prepare.prepare(str(posts), str(tmp_path / "bad"),
                    prepare.Options(image_encoder="vgg16"), log=lambda *a: None)
