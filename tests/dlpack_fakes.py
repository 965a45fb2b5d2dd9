"""Hand-built DLPack capsules (ctypes) for testing the C consumer in rotalabs_steer._core.

The struct layouts mirror csrc/dlpack.h (DLPack 1.x ABI). A FakeTensor owns every buffer
it points at (data, shape, strides, the managed struct, the capsule name) and counts how
often its deleter runs. Its capsule destructor behaves like a real producer's: it calls the
deleter only while the capsule still carries its original name, i.e. when no consumer
took ownership.

Every FakeTensor is also kept in a module-level list for the life of the process: a
capsule that outlives its FakeTensor would otherwise call a freed ctypes thunk or read a
freed struct from its destructor.
"""

from __future__ import annotations

import ctypes
from ctypes import (
    CFUNCTYPE,
    POINTER,
    PYFUNCTYPE,
    Structure,
    c_char_p,
    c_int,
    c_int32,
    c_int64,
    c_uint8,
    c_uint16,
    c_uint32,
    c_uint64,
    c_void_p,
)

import numpy as np

# DLDeviceType / DLDataTypeCode values used by the tests.
CPU, CUDA, CUDA_HOST, CUDA_MANAGED = 1, 2, 3, 13
INT, UINT, FLOAT, BFLOAT, COMPLEX, BOOL = 0, 1, 2, 4, 5, 6
# DLPack 1.1 has float8 types with their own codes (e.g. kDLFloat8_e4m3fn = 10).
FLOAT8_E4M3FN = 10

VERSIONED_NAME = b"dltensor_versioned"
LEGACY_NAME = b"dltensor"


class DLDevice(Structure):
    _fields_ = [("device_type", c_int), ("device_id", c_int32)]


class DLDataType(Structure):
    _fields_ = [("code", c_uint8), ("bits", c_uint8), ("lanes", c_uint16)]


class DLTensor(Structure):
    _fields_ = [
        ("data", c_void_p),
        ("device", DLDevice),
        ("ndim", c_int32),
        ("dtype", DLDataType),
        ("shape", POINTER(c_int64)),
        ("strides", POINTER(c_int64)),
        ("byte_offset", c_uint64),
    ]


# The deleter takes the managed struct's address; void * is ABI-identical to the struct pointer.
DELETER = CFUNCTYPE(None, c_void_p)


class DLManagedTensor(Structure):
    _fields_ = [("dl_tensor", DLTensor), ("manager_ctx", c_void_p), ("deleter", DELETER)]


class DLPackVersion(Structure):
    _fields_ = [("major", c_uint32), ("minor", c_uint32)]


class DLManagedTensorVersioned(Structure):
    _fields_ = [
        ("version", DLPackVersion),
        ("manager_ctx", c_void_p),
        ("deleter", DELETER),
        ("flags", c_uint64),
        ("dl_tensor", DLTensor),
    ]


# The capsule API, through ctypes.pythonapi (PYFUNCTYPE: called with the GIL held). Own
# prototypes rather than setting argtypes on the shared ctypes.pythonapi attributes.
_api = ctypes.pythonapi
_PyCapsule_New = PYFUNCTYPE(ctypes.py_object, c_void_p, c_char_p, c_void_p)(("PyCapsule_New", _api))
_PyCapsule_IsValid = PYFUNCTYPE(c_int, c_void_p, c_char_p)(("PyCapsule_IsValid", _api))
_PyCapsule_GetPointer = PYFUNCTYPE(c_void_p, c_void_p, c_char_p)(("PyCapsule_GetPointer", _api))
_PyCapsule_GetName = PYFUNCTYPE(c_char_p, ctypes.py_object)(("PyCapsule_GetName", _api))
# The destructor gets the dying capsule: a raw pointer, never a py_object (no new reference).
DESTRUCTOR = CFUNCTYPE(None, c_void_p)

_KEEP_ALIVE: list["FakeTensor"] = []


def capsule_name(capsule) -> str | None:
    name = _PyCapsule_GetName(capsule)
    return None if name is None else name.decode()


class FakeTensor:
    """A DLPack tensor over a NumPy buffer, exported as a hand-made capsule.

    array:      the bytes the tensor points at (kept alive here); its dtype only sets the
                default DLPack dtype.
    dtype:      (code, bits, lanes) to override the DLPack dtype.
    shape/strides: override the array's (strides in elements; strides=None with
                null_strides=True gives a NULL strides pointer).
    data:       "array" (default), "null", or an int added to the array address.
    """

    def __init__(
        self,
        array: np.ndarray,
        *,
        versioned: bool = True,
        version: tuple[int, int] = (1, 1),
        dtype: tuple[int, int, int] | None = None,
        device: tuple[int, int] = (CPU, 0),
        shape: tuple[int, ...] | None = None,
        strides: tuple[int, ...] | None = None,
        null_strides: bool = False,
        null_shape: bool = False,
        data: str | int = "array",
        byte_offset: int = 0,
        name: bytes | None = None,
        null_deleter: bool = False,
    ):
        self.array = array
        self.deleter_calls = 0
        self.deleter_args: list[int | None] = []
        self.destructor_calls = 0

        if dtype is None:
            dtype = _dlpack_dtype(array.dtype)
        if shape is None:
            shape = array.shape
        if strides is None and not null_strides:
            strides = tuple(s // array.itemsize for s in array.strides)
        ndim = len(shape)
        self._shape = (c_int64 * max(ndim, 1))(*shape)
        self._strides = None if null_strides else (c_int64 * max(ndim, 1))(*strides)

        if data == "array":
            data_ptr = array.ctypes.data
        elif data == "null":
            data_ptr = None
        else:
            data_ptr = array.ctypes.data + int(data)

        tensor = DLTensor()
        tensor.data = data_ptr
        tensor.device = DLDevice(*device)
        tensor.ndim = ndim
        tensor.dtype = DLDataType(*dtype)
        tensor.shape = None if null_shape else ctypes.cast(self._shape, POINTER(c_int64))
        tensor.strides = (
            None if self._strides is None else ctypes.cast(self._strides, POINTER(c_int64))
        )
        tensor.byte_offset = byte_offset

        self._deleter = DELETER(self._on_delete)
        if versioned:
            managed = DLManagedTensorVersioned()
            managed.version = DLPackVersion(*version)
            managed.flags = 0
        else:
            managed = DLManagedTensor()
        managed.dl_tensor = tensor
        managed.manager_ctx = None
        if not null_deleter:
            managed.deleter = self._deleter
        self.managed = managed
        self.address = ctypes.addressof(managed)
        self.versioned = versioned
        self._name_original = VERSIONED_NAME if versioned else LEGACY_NAME
        # The capsule keeps this pointer as its name: the bytes object must outlive it.
        self._name = name if name is not None else self._name_original
        self._destructor = DESTRUCTOR(self._on_destroy)
        self.capsule = _PyCapsule_New(
            self.address, self._name, ctypes.cast(self._destructor, c_void_p).value
        )
        _KEEP_ALIVE.append(self)

    # -- callbacks ---------------------------------------------------------------------

    def _on_delete(self, pointer):
        self.deleter_calls += 1
        self.deleter_args.append(pointer)

    def _on_destroy(self, capsule):
        # Like numpy's and torch's destructors: free only an unconsumed capsule.
        self.destructor_calls += 1
        if not _PyCapsule_IsValid(capsule, self._name_original):
            return
        pointer = _PyCapsule_GetPointer(capsule, self._name_original)
        if self.managed.deleter:
            self.managed.deleter(pointer)

    # -- helpers -----------------------------------------------------------------------

    def take_capsule(self):
        """Hands out the capsule and drops this object's reference to it."""
        capsule, self.capsule = self.capsule, None
        return capsule


class Producer:
    """An object with __dlpack__ (and optionally __dlpack_device__) returning a given capsule."""

    def __init__(self, capsule, *, accepts_max_version=True, device=(CPU, 0), error=None):
        self._capsule = capsule
        self.accepts_max_version = accepts_max_version
        self.device = device
        self.error = error
        self.requests: list[dict] = []

    def __dlpack__(self, **kwargs):
        self.requests.append(kwargs)
        if self.error is not None:
            raise self.error
        if kwargs and not self.accepts_max_version:
            raise TypeError("__dlpack__() got an unexpected keyword argument 'max_version'")
        capsule, self._capsule = self._capsule, None
        return capsule

    def __dlpack_device__(self):
        return self.device


def _dlpack_dtype(dtype: np.dtype) -> tuple[int, int, int]:
    dtype = np.dtype(dtype)
    if dtype == np.bool_:
        return (BOOL, 8, 1)
    kind = {"f": FLOAT, "i": INT, "u": UINT, "c": COMPLEX}[dtype.kind]
    return (kind, dtype.itemsize * 8, 1)
