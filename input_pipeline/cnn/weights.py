"""How are a network's weights read from a PyTorch or safetensors file, safely?

`read_torch` reads a state dict saved by `torch.save` (the zip archive of
torch >= 1.6 or the older "legacy" stream) WITHOUT executing pickled code and
without torch: a restricted unpickler admits only OrderedDict, torch's tensor
rebuilding (`torch._utils._rebuild_tensor_v2`) and the typed storages, and the
storages' bytes are read with NumPy. Any other global in the pickle (a class,
a function such as os.system) is refused with UnsafePickleError.

`read_state_dict` reads any supported file (.pth/.pt/.bin pickles,
.safetensors, .npz) into {name: np.ndarray}; a pickle is converted once and
cached as .npz under `cache_dir()` ($SEMPRE_JAX_CACHE, else
~/.cache/sempre_jax), keyed by the file's path, size and mtime.

`to_flax` turns a PyTorch-named state dict into Flax variables: module names
join their numeric indices ('layer1.0.conv1' -> layer1_0/conv1), conv kernels
[O, I, kh, kw] -> [kh, kw, I, O], linear [O, I] -> [I, O], batch norms to
params {scale, bias} and batch_stats {mean, var}; `num_batches_tracked` is
dropped. `check_variables` compares that tree with a module's own.
"""

import collections
import hashlib
import io
import json
import os
import pickle
import struct
import tempfile
import zipfile
from collections.abc import Mapping

import ml_dtypes
import numpy as np

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
# torch's typed storages -> the NumPy dtype of their elements.
STORAGE_DTYPES = {
    "DoubleStorage": np.float64, "FloatStorage": np.float32, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}
SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}


class UnsafePickleError(pickle.UnpicklingError):
  """A pickle that asks for anything but tensors, storages and OrderedDict."""


class _Tensor:
  """A tensor still to be built once its storage's bytes are known."""

  def __init__(self, storage, offset, size, stride):
    self.storage, self.offset, self.size, self.stride = storage, offset, tuple(size), tuple(stride)

  def build(self, storages: Mapping[str, np.ndarray]) -> np.ndarray:
    data = storages[self.storage]
    numbers = self.size + self.stride + (self.offset,)
    if len(self.size) != len(self.stride) or not all(
        isinstance(v, int) and v >= 0 for v in numbers):
      raise ValueError(f"a malformed tensor (size {self.size}, stride {self.stride})")
    last = self.offset + sum((n - 1) * s for n, s in zip(self.size, self.stride))
    if 0 not in self.size and last >= data.size:
      raise ValueError(f"a tensor {self.size} reaches outside its storage of {data.size} elements")
    if not self.size:
      return np.array(data[self.offset])
    view = np.lib.stride_tricks.as_strided(
        data[self.offset:], self.size, [s * data.itemsize for s in self.stride], writeable=False)
    return np.ascontiguousarray(view)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
  del requires_grad, backward_hooks, metadata
  return _Tensor(storage, storage_offset, size, stride)


class _Unpickler(pickle.Unpickler):
  """Admits OrderedDict, _rebuild_tensor_v2 and typed storages; nothing else."""

  def __init__(self, file, storage):
    super().__init__(file)
    self._storage = storage   # persistent id tuple -> storage key (records its dtype)

  def find_class(self, module, name):
    if (module, name) == ("collections", "OrderedDict"):
      return collections.OrderedDict
    if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
      return _rebuild_tensor_v2
    if module == "torch" and name in STORAGE_DTYPES:
      return name
    raise UnsafePickleError(f"refusing to load {module}.{name} from a weights pickle")

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
      raise UnsafePickleError(f"unexpected persistent id {pid!r} in a weights pickle")
    return self._storage(pid)


def _storage_dtype(kind) -> np.dtype:
  if kind not in STORAGE_DTYPES:
    raise UnsafePickleError(f"unexpected storage type {kind!r} in a weights pickle")
  return np.dtype(STORAGE_DTYPES[kind])


def _build(obj, storages):
  """Replaces every _Tensor in a nest of dicts/lists by its array."""
  if isinstance(obj, _Tensor):
    return obj.build(storages)
  if isinstance(obj, dict):
    return type(obj)((k, _build(v, storages)) for k, v in obj.items())
  if isinstance(obj, (list, tuple)):
    return type(obj)(_build(v, storages) for v in obj)
  return obj


def _read_zip(path: str):
  with zipfile.ZipFile(path) as z:
    pkl = [n for n in z.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(pkl) != 1:
      raise ValueError(f"{path}: a zip archive without one <name>/data.pkl; not a torch.save file")
    prefix = pkl[0][:-len("data.pkl")]
    dtypes = {}

    def storage(pid):   # ('storage', type, key, location, numel)
      dtypes[pid[2]] = _storage_dtype(pid[1])
      return pid[2]

    obj = _Unpickler(io.BytesIO(z.read(pkl[0])), storage).load()
    storages = {k: np.frombuffer(z.read(f"{prefix}data/{k}"), dt) for k, dt in dtypes.items()}
  return _build(obj, storages)


def _read_legacy(path: str):
  with open(path, "rb") as f:
    def load(storage=None):
      return _Unpickler(f, storage or (lambda pid: None)).load()
    if load() != LEGACY_MAGIC:
      raise ValueError(f"{path}: not a torch.save file (neither zip nor legacy format)")
    load()   # protocol version
    if not load().get("little_endian", True):   # system info
      raise ValueError(f"{path}: a big-endian legacy torch file is not supported")
    dtypes, views = {}, {}

    def storage(pid):   # ('storage', type, root key, location, numel, view or None)
      _, kind, key, _, _, view = pid
      dtypes[key] = _storage_dtype(kind)
      if view is None:
        return key
      views[view[0]] = (key, view[1], view[2])
      return view[0]

    obj = load(storage)
    storages = {}
    for key in load():
      numel, = struct.unpack("<q", f.read(8))
      dt = dtypes[key]
      storages[key] = np.frombuffer(f.read(numel * dt.itemsize), dt, count=numel)
  for view, (key, offset, numel) in views.items():   # offset in elements
    storages[view] = storages[key][offset:offset + numel]
  return _build(obj, storages)


def read_torch(path: str) -> dict[str, np.ndarray]:
  """A state dict saved by torch.save -> {name: array}, executing no pickled code."""
  obj = _read_zip(path) if zipfile.is_zipfile(path) else _read_legacy(path)
  if not (isinstance(obj, dict) and all(isinstance(v, np.ndarray) for v in obj.values())):
    raise ValueError(f"{path}: expected a state dict (name -> tensor), got {type(obj).__name__}")
  return dict(obj)


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  """A .safetensors file -> {name: array} (8-byte header length, JSON header, data)."""
  with open(path, "rb") as f:
    n, = struct.unpack("<Q", f.read(8))
    header = json.loads(f.read(n))
    data = f.read()
  out = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    begin, end = info["data_offsets"]
    out[name] = np.frombuffer(data[begin:end], SAFETENSORS_DTYPES[info["dtype"]]).reshape(
        info["shape"]).copy()
  return out


def cache_dir() -> str:
  """$SEMPRE_JAX_CACHE, else ~/.cache/sempre_jax."""
  return os.environ.get("SEMPRE_JAX_CACHE") or os.path.join(
      os.path.expanduser("~"), ".cache", "sempre_jax")


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """Any weights file -> {name: array}: .safetensors, .npz, or a torch pickle (cached)."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no weights file at {path}")
  if path.endswith(".safetensors"):
    return read_safetensors(path)
  if path.endswith(".npz"):
    with np.load(path) as z:
      return dict(z)
  st = os.stat(path)
  tag = hashlib.sha256(f"{os.path.realpath(path)}|{st.st_size}|{st.st_mtime_ns}".encode())
  cached = os.path.join(cache_dir(), f"{os.path.basename(path)}-{tag.hexdigest()[:16]}.npz")
  if os.path.exists(cached):
    with np.load(cached) as z:
      return dict(z)
  state = read_torch(path)
  write_npz(cached, state)
  return state


def write_npz(path: str, arrays: Mapping[str, np.ndarray]) -> None:
  """Writes {key: array} as an .npz that np.load reads back by key, atomically:
  readers see all of it or nothing. (np.savez(**arrays) would take a key named
  'file' or 'allow_pickle' for its own argument.)"""
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  with tempfile.NamedTemporaryFile(dir=folder, suffix=".npz", delete=False) as f:
    with zipfile.ZipFile(f, "w") as z:
      for key, value in arrays.items():
        with z.open(f"{key}.npy", "w", force_zip64=True) as member:
          np.lib.format.write_array(member, np.asarray(value), allow_pickle=False)
  os.chmod(f.name, 0o644)
  os.replace(f.name, path)


def to_flax(state: Mapping[str, np.ndarray]) -> dict:
  """PyTorch-named state dict -> Flax variables {'params': ..., 'batch_stats': ...}."""
  variables = {"params": {}, "batch_stats": {}}
  for key, value in state.items():
    parts = key.split(".")
    modules, leaf = [], parts[-1]
    for p in parts[:-1]:
      if p.isdigit() and modules:
        modules[-1] += f"_{p}"
      else:
        modules.append(p)
    prefix = ".".join(parts[:-1])
    is_bn = f"{prefix}.running_mean" in state
    if leaf == "num_batches_tracked":
      continue
    if is_bn:
      collection, name = {"weight": ("params", "scale"), "bias": ("params", "bias"),
                          "running_mean": ("batch_stats", "mean"),
                          "running_var": ("batch_stats", "var")}[leaf]
    elif leaf == "weight" and value.ndim == 4:
      collection, name, value = "params", "kernel", value.transpose(2, 3, 1, 0)
    elif leaf == "weight" and value.ndim == 2:
      collection, name, value = "params", "kernel", value.T
    elif leaf == "bias":
      collection, name = "params", "bias"
    else:
      raise ValueError(f"cannot map weight {key!r} of shape {value.shape} to Flax")
    node = variables[collection]
    for m in modules:
      node = node.setdefault(m, {})
    node[name] = np.asarray(value, np.float32)
  return variables


def check_variables(variables: Mapping, expected: Mapping, what: str) -> None:
  """Raises ValueError naming missing, unexpected or misshapen weights."""
  def flat(tree, prefix=""):
    out = {}
    for k, v in tree.items():
      if isinstance(v, Mapping):
        out.update(flat(v, f"{prefix}{k}/"))
      else:
        out[f"{prefix}{k}"] = tuple(v.shape)
    return out
  got, want = flat(variables), flat(expected)
  missing, extra = sorted(want.keys() - got.keys()), sorted(got.keys() - want.keys())
  shapes = sorted(k for k in want.keys() & got.keys() if want[k] != got[k])
  if missing or extra or shapes:
    raise ValueError(
        f"{what}: weights do not fit the network: missing {missing[:3]}, unexpected "
        f"{extra[:3]}, wrong shape {[(k, got[k], want[k]) for k in shapes[:3]]}")
