"""Read a state_dict saved by `torch.save` into numpy arrays, without torch.

    from gmic_jax.torch_format import read_torch_state_dict
    state_dict = read_torch_state_dict("sample_model_1.p")   # {key: np.ndarray}

Both formats `torch.save` writes are read:

* the zip archive of torch >= 1.6: `<prefix>/data.pkl` (the pickled object) and one record
  `<prefix>/data/<key>` of raw bytes per storage, in the byte order the `byteorder` record names
  (little endian when it is absent);
* the legacy stream of older torch (and of `_use_new_zipfile_serialization=False`): five
  consecutive pickles -- magic number, protocol version, system info, the object, the sorted list
  of storage keys -- followed, per key in that order, by an int64 little-endian element count and
  the storage's bytes (always little endian).

Tensors are pickled as `torch._utils._rebuild_tensor_v2(storage, storage_offset, size, stride,
requires_grad, backward_hooks[, metadata])`, storages as persistent ids. The unpickler resolves
only the globals a state_dict needs (the tensor rebuild functions, the `torch.<T>Storage` types,
`collections.OrderedDict`); any other global is refused, so reading a file never runs code from
it. Each tensor is rebuilt as a numpy copy of its view into the storage (offset, size and stride
in elements), bounds-checked against the storage.
"""

from __future__ import annotations

import io
import pickle
import struct
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any, Mapping

import ml_dtypes
import numpy as np

MAGIC_NUMBER = 0x1950A86A20F9469CFC6C  # first pickle of the legacy format
PROTOCOL_VERSION = 1001  # second pickle of the legacy format

# torch.<name> storage classes of the pickles -> numpy dtype (BFloat16 through ml_dtypes, as in JAX).
_STORAGE_DTYPES = {
    "DoubleStorage": "float64",
    "FloatStorage": "float32",
    "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16",
    "LongStorage": "int64",
    "IntStorage": "int32",
    "ShortStorage": "int16",
    "CharStorage": "int8",
    "ByteStorage": "uint8",
    "BoolStorage": "bool",
    "ComplexDoubleStorage": "complex128",
    "ComplexFloatStorage": "complex64",
}


class TorchFormatError(ValueError):
    """A file that is not a torch-saved state_dict this reader can read; the message says why."""


def _numpy_dtype(name: str) -> np.dtype:
    if name == "bfloat16":
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


class _StorageType:
    """What the unpickler returns for `torch.FloatStorage` etc.: only its element type."""

    def __init__(self, name: str):
        self.name = name
        self.dtype = _numpy_dtype(_STORAGE_DTYPES[name])


class _Storage:
    """One storage of the file: its element type and count; `data` is filled once its bytes are read."""

    def __init__(self, key: str, dtype: np.dtype, numel: int):
        self.key, self.dtype, self.numel = key, dtype, int(numel)
        self.data: np.ndarray | None = None


class _StorageView:
    """A legacy-format view of elements [offset, offset + numel) of a root storage."""

    def __init__(self, root: _Storage, offset: int, numel: int):
        self.root, self.offset, self.numel = root, int(offset), int(numel)


class _Tensor:
    """A tensor as pickled: its view into a storage, rebuilt by :meth:`array` once the bytes are read."""

    def __init__(self, storage, storage_offset, size, stride, metadata=None):
        if not isinstance(storage, (_Storage, _StorageView)):
            raise TorchFormatError(f"a tensor is rebuilt from a {type(storage).__name__}, not a storage")
        self.storage, self.offset = storage, int(storage_offset)
        self.size, self.stride = tuple(int(n) for n in size), tuple(int(s) for s in stride)
        if len(self.size) != len(self.stride):
            raise TorchFormatError(f"a tensor of size {self.size} has strides {self.stride}")
        # torch's lazy negation / conjugation bits: the storage holds the values before them.
        metadata = dict(metadata or {})
        self.neg, self.conj = bool(metadata.pop("neg", False)), bool(metadata.pop("conj", False))
        if any(metadata.values()):
            raise TorchFormatError(f"a tensor with unknown metadata {metadata}")

    def array(self) -> np.ndarray:
        storage, offset = self.storage, self.offset
        if isinstance(storage, _StorageView):
            if storage.offset < 0 or storage.offset + storage.numel > storage.root.numel:
                raise TorchFormatError(
                    f"a storage view [{storage.offset}, +{storage.numel}) lies outside its "
                    f"storage of {storage.root.numel} elements"
                )
            base = storage.root.data[storage.offset : storage.offset + storage.numel]
        else:
            base = storage.data
        if base is None:
            raise TorchFormatError("its storage has no data in the file")
        if any(n < 0 for n in self.size) or any(s < 0 for s in self.stride) or offset < 0:
            raise TorchFormatError(f"a tensor has size {self.size}, stride {self.stride}, offset {offset}")
        if 0 in self.size:
            return np.zeros(self.size, base.dtype.newbyteorder("="))
        last = offset + sum((n - 1) * s for n, s in zip(self.size, self.stride))
        if last >= base.size:
            raise TorchFormatError(
                f"a tensor of size {self.size}, stride {self.stride}, offset {offset} reaches "
                f"element {last} of a storage of {base.size}"
            )
        view = np.lib.stride_tricks.as_strided(
            base[offset:], shape=self.size, strides=[s * base.itemsize for s in self.stride], writeable=False
        )
        out = np.array(view, dtype=base.dtype.newbyteorder("="), order="C")
        if self.neg:
            out = -out
        if self.conj:
            out = np.conj(out)
        return out


def _rebuild_tensor(storage, storage_offset, size, stride):
    return _Tensor(storage, storage_offset, size, stride)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    # requires_grad and hooks do not change the values a state_dict holds.
    return _Tensor(storage, storage_offset, size, stride, metadata)


_ALLOWED_GLOBALS = {
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("collections", "OrderedDict"): OrderedDict,
}


def _decode(value) -> str:
    return value.decode("ascii") if isinstance(value, bytes) else str(value)


class _Unpickler(pickle.Unpickler):
    """Resolves only the globals of a state_dict; storages (persistent ids) come from `storages`."""

    def __init__(self, file, storages: dict[str, _Storage], legacy: bool):
        super().__init__(file)
        self.storages, self.legacy = storages, legacy
        self.views: dict[str, _StorageView] = {}

    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED_GLOBALS:
            return _ALLOWED_GLOBALS[(module, name)]
        if module in ("torch", "torch.cuda") and name in _STORAGE_DTYPES:
            return _StorageType(name)
        raise TorchFormatError(
            f"refusing the pickled global {module}.{name}: a state_dict holds only tensors "
            "(torch._utils._rebuild_tensor_v2, torch.<T>Storage, collections.OrderedDict)"
        )

    def persistent_load(self, pid):
        if not isinstance(pid, tuple) or not pid:
            raise TorchFormatError(f"unknown persistent id {pid!r}")
        typename = _decode(pid[0])
        if typename == "module":
            raise TorchFormatError("holds a pickled torch.nn.Module, not a state_dict (save model.state_dict())")
        expected = 6 if self.legacy else 5
        if typename != "storage" or len(pid) != expected:
            raise TorchFormatError(f"unknown persistent id {pid[:expected]!r}")
        storage_type, key, _location, numel = pid[1:5]
        if not isinstance(storage_type, _StorageType):
            raise TorchFormatError(f"a storage of type {storage_type!r}")
        key = _decode(key)
        storage = self.storages.get(key)
        if storage is None:
            storage = self.storages[key] = _Storage(key, storage_type.dtype, numel)
        elif storage.dtype != storage_type.dtype:
            raise TorchFormatError(f"storage {key} is read as {storage.dtype} and as {storage_type.dtype}")
        if self.legacy and pid[5] is not None:  # (view key, offset, numel) of a view of the root storage
            view_key, offset, view_numel = pid[5]
            view_key = _decode(view_key)
            if view_key not in self.views:
                self.views[view_key] = _StorageView(storage, offset, view_numel)
            return self.views[view_key]
        return storage


def _read_zip(raw: bytes) -> Any:
    with zipfile.ZipFile(io.BytesIO(raw)) as zf:
        names = zf.namelist()
        if not names:
            raise TorchFormatError("an empty zip archive")
        # Every record lies under one folder, the archive's name (torch's reader takes it from the first).
        prefix = names[0].split("/", 1)[0] + "/"
        if prefix + "data.pkl" not in names:
            raise TorchFormatError(f"a zip archive without {prefix}data.pkl: not saved by torch.save")
        byteorder = zf.read(prefix + "byteorder").decode("ascii") if prefix + "byteorder" in names else "little"
        if byteorder not in ("little", "big"):
            raise TorchFormatError(f"unknown byte order {byteorder!r}")
        storages: dict[str, _Storage] = {}
        obj = _Unpickler(io.BytesIO(zf.read(prefix + "data.pkl")), storages, legacy=False).load()
        order = "<" if byteorder == "little" else ">"
        for key, storage in storages.items():
            record = f"{prefix}data/{key}"
            if record not in names:
                raise TorchFormatError(f"storage record {record} is missing")
            data = zf.read(record)
            nbytes = storage.numel * storage.dtype.itemsize
            if len(data) != nbytes:
                raise TorchFormatError(
                    f"storage record {record} has {len(data)} bytes, expected {nbytes} "
                    f"({storage.numel} x {storage.dtype})"
                )
            storage.data = np.frombuffer(data, storage.dtype.newbyteorder(order))
    return obj


def _read_legacy(raw: bytes) -> Any:
    f = io.BytesIO(raw)
    header = _Unpickler(f, {}, legacy=True)
    if header.load() != MAGIC_NUMBER:
        raise TorchFormatError("not a PyTorch checkpoint (neither a zip archive nor torch.save's legacy magic number)")
    version = header.load()
    if version != PROTOCOL_VERSION:
        raise TorchFormatError(f"legacy protocol version {version}, expected {PROTOCOL_VERSION}")
    header.load()  # system info: the writer's byte order and C type sizes; the data are little endian
    storages: dict[str, _Storage] = {}
    obj = _Unpickler(f, storages, legacy=True).load()
    keys = _Unpickler(f, {}, legacy=True).load()
    if not isinstance(keys, list) or set(map(_decode, keys)) != set(storages):
        raise TorchFormatError(f"the list of storage keys {keys!r} does not match the pickled tensors' storages")
    offset = f.tell()
    for key in map(_decode, keys):
        storage = storages[key]
        if offset + 8 > len(raw):
            raise TorchFormatError(f"the file ends before storage {key} (truncated?)")
        (numel,) = struct.unpack_from("<q", raw, offset)
        if numel != storage.numel:
            raise TorchFormatError(f"storage {key} has {numel} elements in the data, {storage.numel} in the pickle")
        nbytes = numel * storage.dtype.itemsize
        if offset + 8 + nbytes > len(raw):
            raise TorchFormatError(f"the file ends inside storage {key} (truncated?)")
        storage.data = np.frombuffer(raw, storage.dtype.newbyteorder("<"), count=numel, offset=offset + 8)
        offset += 8 + nbytes
    return obj


def _materialize(obj) -> dict[str, np.ndarray]:
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]  # a training checkpoint {"state_dict": ..., ...}
    if not isinstance(obj, Mapping) or not all(isinstance(v, _Tensor) for v in obj.values()):
        raise TorchFormatError(f"holds a {type(obj).__name__}, not a state_dict of tensors")
    out = {}
    for key, tensor in obj.items():
        try:
            out[str(key)] = tensor.array()
        except TorchFormatError as e:
            raise TorchFormatError(f"tensor {key!r}: {e}") from None
    return out


def read_torch_state_dict(path) -> dict[str, np.ndarray]:
    """{key: array} of the state_dict in a file written by `torch.save` (either format). Raises
    :class:`TorchFormatError` naming the file for anything else: other pickled objects, truncated
    or corrupt files."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise TorchFormatError(f"{path}: cannot read ({e.strerror})") from None
    try:
        if zipfile.is_zipfile(io.BytesIO(raw)):
            obj = _read_zip(raw)
        elif raw.startswith(b"PK\x03\x04"):
            raise TorchFormatError("a damaged or truncated zip archive")
        elif raw[257:262] == b"ustar":
            raise TorchFormatError("a tar archive (the oldest torch.save format): not supported")
        else:
            obj = _read_legacy(raw)
        return _materialize(obj)
    except TorchFormatError as e:
        raise TorchFormatError(f"{path}: {e}") from None
    except (
        pickle.UnpicklingError,
        EOFError,
        zipfile.BadZipFile,
        ValueError,
        TypeError,
        KeyError,
        IndexError,
        AttributeError,
        struct.error,
        UnicodeDecodeError,
    ) as e:
        raise TorchFormatError(f"{path}: not a PyTorch checkpoint ({type(e).__name__}: {str(e)[:200]})") from None
