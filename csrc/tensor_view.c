/*
 * DLPack consumer: turns any producer's tensor (torch, NumPy, a raw capsule) into a
 * TensorView the reduction can read without the GIL. Follows the consumer rules in
 * DESIGN.md: ask for a versioned capsule, fall back to legacy on TypeError only, take
 * ownership by renaming the capsule, and call the producer's deleter exactly once.
 */
#include "core.h"

#include <stdio.h>
#include <string.h>

static const char VERSIONED_NAME[] = "dltensor_versioned";
static const char VERSIONED_USED[] = "used_dltensor_versioned";
static const char LEGACY_NAME[] = "dltensor";
static const char LEGACY_USED[] = "used_dltensor";

const char *rs_dtype_name(RsDtype dtype)
{
    switch (dtype) {
    case RS_F16: return "float16";
    case RS_BF16: return "bfloat16";
    case RS_F32: return "float32";
    case RS_F64: return "float64";
    case RS_I8: return "int8";
    case RS_I16: return "int16";
    case RS_I32: return "int32";
    case RS_I64: return "int64";
    case RS_U8: return "uint8";
    case RS_BOOL: return "bool";
    }
    return "?";
}

static const char *device_name(int device_type)
{
    switch (device_type) {
    case kDLCPU: return "cpu";
    case kDLCUDA: return "cuda";
    case kDLCUDAHost: return "cuda_host";
    case kDLOpenCL: return "opencl";
    case kDLVulkan: return "vulkan";
    case kDLMetal: return "metal (mps)";
    case kDLVPI: return "vpi";
    case kDLROCM: return "rocm";
    case kDLROCMHost: return "rocm_host";
    case kDLExtDev: return "ext_dev";
    case kDLCUDAManaged: return "cuda_managed";
    case kDLOneAPI: return "oneapi (xpu)";
    case kDLWebGPU: return "webgpu";
    case kDLHexagon: return "hexagon";
    case kDLMAIA: return "maia";
    }
    return "unknown";
}

/* Names a DLPack dtype for error messages, e.g. "complex64", "float8 (DLPack code 10)". */
static void describe_dtype(DLDataType dt, char *out, size_t size)
{
    const char *base = NULL;
    switch (dt.code) {
    case kDLInt: base = "int"; break;
    case kDLUInt: base = "uint"; break;
    case kDLFloat: base = "float"; break;
    case kDLBfloat: base = "bfloat"; break;
    case kDLComplex: base = "complex"; break;
    case kDLBool: base = "bool"; break;
    case kDLOpaqueHandle: base = "opaque handle"; break;
    }
    int n;
    if (base != NULL)
        n = snprintf(out, size, "%s%u", base, (unsigned)dt.bits);
    else if (dt.code >= 7 && dt.code <= 14)
        n = snprintf(out, size, "float8 (DLPack code %u)", (unsigned)dt.code);
    else if (dt.code >= 15 && dt.code <= 16)
        n = snprintf(out, size, "float6 (DLPack code %u)", (unsigned)dt.code);
    else if (dt.code == 17)
        n = snprintf(out, size, "float4 (DLPack code %u)", (unsigned)dt.code);
    else
        n = snprintf(out, size, "unknown (DLPack code %u, %u bits)", (unsigned)dt.code, (unsigned)dt.bits);
    if (dt.lanes != 1 && n >= 0 && (size_t)n < size)
        snprintf(out + n, size - (size_t)n, " x%u lanes", (unsigned)dt.lanes);
}

/* Maps a DLPack dtype to ours; -1 when this extension does not read it. */
static int map_dtype(DLDataType dt, RsDtype *out, int *itemsize)
{
    if (dt.lanes != 1)
        return -1;
    switch (dt.code) {
    case kDLFloat:
        if (dt.bits == 16) { *out = RS_F16; *itemsize = 2; return 0; }
        if (dt.bits == 32) { *out = RS_F32; *itemsize = 4; return 0; }
        if (dt.bits == 64) { *out = RS_F64; *itemsize = 8; return 0; }
        return -1;
    case kDLBfloat:
        if (dt.bits == 16) { *out = RS_BF16; *itemsize = 2; return 0; }
        return -1;
    case kDLInt:
        if (dt.bits == 8) { *out = RS_I8; *itemsize = 1; return 0; }
        if (dt.bits == 16) { *out = RS_I16; *itemsize = 2; return 0; }
        if (dt.bits == 32) { *out = RS_I32; *itemsize = 4; return 0; }
        if (dt.bits == 64) { *out = RS_I64; *itemsize = 8; return 0; }
        return -1;
    case kDLUInt:
        if (dt.bits == 8) { *out = RS_U8; *itemsize = 1; return 0; }
        return -1;
    case kDLBool:
        if (dt.bits == 8) { *out = RS_BOOL; *itemsize = 1; return 0; }
        return -1;
    }
    return -1;
}

int tensor_view_is_float(const TensorView *view)
{
    return view->dtype == RS_F16 || view->dtype == RS_BF16 || view->dtype == RS_F32 ||
           view->dtype == RS_F64;
}

void tensor_view_release(TensorView *view)
{
    /* A producer's deleter may run Python code; keep any pending error out of its way. */
    PyObject *pending = PyErr_GetRaisedException();
    if (view->versioned != NULL) {
        DLManagedTensorVersioned *managed = view->versioned;
        view->versioned = NULL;
        if (managed->deleter != NULL)
            managed->deleter(managed);
    }
    if (view->legacy != NULL) {
        DLManagedTensor *managed = view->legacy;
        view->legacy = NULL;
        if (managed->deleter != NULL)
            managed->deleter(managed);
    }
    PyErr_SetRaisedException(pending);
}

/* Drops a reference while an exception is pending: the object's destructor (a capsule's
 * runs producer code, which may be Python) must neither see nor clobber the error. */
static void drop_keeping_error(PyObject *obj)
{
    PyObject *pending = PyErr_GetRaisedException();
    Py_DECREF(obj);
    PyErr_SetRaisedException(pending);
}

/* Calls obj.__dlpack__(max_version=(1, minor)), or obj.__dlpack__() when the producer
 * predates the keyword (TypeError only). Returns a new reference or NULL. */
static PyObject *request_capsule(CoreState *state, PyObject *obj, const char *what)
{
    if (PyCapsule_CheckExact(obj))
        return Py_NewRef(obj);

    /* Looked up apart from the call so that a missing method gets our TypeError while an
     * AttributeError raised inside __dlpack__ propagates as it is. */
    PyObject *method = PyObject_GetAttr(obj, state->str_dlpack);
    if (method == NULL) {
        PyErr_Clear();
        PyErr_Format(PyExc_TypeError,
                     "%s must be a tensor or array that supports DLPack (torch.Tensor, "
                     "numpy.ndarray), not %.200s",
                     what, Py_TYPE(obj)->tp_name);
        return NULL;
    }
    /* No positional arguments and one keyword value; args[0] is the scratch slot that
     * PY_VECTORCALL_ARGUMENTS_OFFSET lets the callee borrow (e.g. for a bound self). */
    PyObject *args[2] = {NULL, state->max_version};
    PyObject *capsule = PyObject_Vectorcall(method, args + 1, PY_VECTORCALL_ARGUMENTS_OFFSET,
                                            state->kwnames_max_version);
    if (capsule == NULL && PyErr_ExceptionMatches(PyExc_TypeError)) {
        PyErr_Clear();
        capsule = PyObject_CallNoArgs(method);
    }
    Py_DECREF(method);
    if (capsule != NULL && !PyCapsule_CheckExact(capsule)) {
        PyErr_Format(PyExc_TypeError, "%s.__dlpack__() returned %.200s, not a capsule", what,
                     Py_TYPE(capsule)->tp_name);
        drop_keeping_error(capsule);
        capsule = NULL;
    }
    return capsule;
}

/* Strides of a compact row-major tensor, as DLPack's NULL strides mean; size-0 dims count
 * as 1. -1 when one does not fit in int64: impossible when numel != 0 (numel bounds them),
 * but a size-0 tensor may have huge other dims, e.g. (0, 2**62, 2**62). */
static int fill_row_major_strides(TensorView *view)
{
    int64_t running = 1;
    for (int32_t d = view->ndim - 1; d >= 0; d--) {
        view->strides[d] = running;
        int64_t n = view->shape[d] > 1 ? view->shape[d] : 1;
        if (d > 0 && running > INT64_MAX / n)
            return -1;
        running *= n;
    }
    return 0;
}

/* Validates the DLTensor of an owned view and fills in the fields. -1 with error set. */
static int describe(const DLTensor *t, const char *what, TensorView *view)
{
    if (map_dtype(t->dtype, &view->dtype, &view->itemsize) < 0) {
        char name[64];
        describe_dtype(t->dtype, name, sizeof(name));
        PyErr_Format(PyExc_TypeError,
                     "%s has dtype %s, which is not supported; expected float16, bfloat16, "
                     "float32 or float64 activations, or integer/bool indices and masks",
                     what, name);
        return -1;
    }
    view->device_type = t->device.device_type;
    if (t->device.device_type != kDLCPU && t->device.device_type != kDLCUDAHost &&
        t->device.device_type != kDLCUDAManaged) {
        PyErr_Format(PyExc_ValueError,
                     "%s is on device '%s' (DLPack device type %d), which the CPU cannot "
                     "read; move it to the CPU first",
                     what, device_name(t->device.device_type), t->device.device_type);
        return -1;
    }
    if (t->ndim < 0 || t->ndim > RS_MAX_NDIM) {
        PyErr_Format(PyExc_ValueError, "%s has %d dimensions; at most %d are supported", what,
                     (int)t->ndim, RS_MAX_NDIM);
        return -1;
    }
    if (t->ndim > 0 && t->shape == NULL) {
        PyErr_Format(PyExc_BufferError, "%s: DLPack tensor has a NULL shape", what);
        return -1;
    }
    view->ndim = t->ndim;
    int64_t numel = 1;
    for (int32_t d = 0; d < t->ndim; d++) {
        int64_t n = t->shape[d];
        if (n < 0) {
            PyErr_Format(PyExc_BufferError, "%s: DLPack shape[%d] is negative (%lld)", what,
                         (int)d, (long long)n);
            return -1;
        }
        view->shape[d] = n;
        if (n != 0 && numel > INT64_MAX / n) {
            PyErr_Format(PyExc_BufferError, "%s: DLPack shape overflows int64", what);
            return -1;
        }
        numel *= n;
    }
    view->numel = numel;
    if (t->strides != NULL) {
        for (int32_t d = 0; d < t->ndim; d++)
            view->strides[d] = t->strides[d];
    }
    else if (fill_row_major_strides(view) < 0) {
        PyErr_Format(PyExc_BufferError,
                     "%s: the row-major strides of DLPack shape overflow int64 (NULL strides)",
                     what);
        return -1;
    }
    if (numel == 0) {
        view->data = NULL;
        return 0;
    }
    if (t->data == NULL) {
        PyErr_Format(PyExc_BufferError, "%s: DLPack tensor with %lld elements has NULL data",
                     what, (long long)numel);
        return -1;
    }
    const char *data = (const char *)t->data + t->byte_offset;
    if ((uintptr_t)data % (uintptr_t)view->itemsize != 0) {
        PyErr_Format(PyExc_BufferError, "%s: data pointer is not aligned to its %d-byte dtype",
                     what, view->itemsize);
        return -1;
    }
    view->data = data;
    return 0;
}

int tensor_view_acquire(CoreState *state, PyObject *obj, const char *what, TensorView *view)
{
    memset(view, 0, sizeof(*view));
    PyObject *capsule = request_capsule(state, obj, what);
    if (capsule == NULL)
        return -1;

    const char *name = PyCapsule_GetName(capsule);
    if (name == NULL && PyErr_Occurred())
        goto error;
    const DLTensor *tensor = NULL;
    if (name != NULL && strcmp(name, VERSIONED_NAME) == 0) {
        DLManagedTensorVersioned *managed = PyCapsule_GetPointer(capsule, VERSIONED_NAME);
        if (managed == NULL)
            goto error;
        if (managed->version.major != RS_DLPACK_MAJOR) {
            /* Unknown ABI: read nothing else; dropping the capsule lets its destructor free it. */
            PyErr_Format(PyExc_BufferError,
                         "%s: unsupported DLPack major version %u (this build reads %d.x)", what,
                         (unsigned)managed->version.major, RS_DLPACK_MAJOR);
            goto error;
        }
        if (PyCapsule_SetName(capsule, VERSIONED_USED) < 0)
            goto error;
        view->versioned = managed;
        tensor = &managed->dl_tensor;
    }
    else if (name != NULL && strcmp(name, LEGACY_NAME) == 0) {
        DLManagedTensor *managed = PyCapsule_GetPointer(capsule, LEGACY_NAME);
        if (managed == NULL)
            goto error;
        if (PyCapsule_SetName(capsule, LEGACY_USED) < 0)
            goto error;
        view->legacy = managed;
        tensor = &managed->dl_tensor;
    }
    else {
        PyErr_Format(PyExc_BufferError,
                     "%s: expected a DLPack capsule named 'dltensor_versioned' or 'dltensor', "
                     "got '%s' (a capsule can be consumed only once)",
                     what, name != NULL ? name : "(null)");
        goto error;
    }
    Py_DECREF(capsule);
    if (describe(tensor, what, view) < 0) {
        tensor_view_release(view);
        return -1;
    }
    return 0;

error:
    drop_keeping_error(capsule);
    return -1;
}

int64_t tensor_view_int_at(const TensorView *view, int64_t offset)
{
    const char *p = view->data + offset * view->itemsize;
    switch (view->dtype) {
    case RS_I8: { int8_t v; memcpy(&v, p, 1); return v; }
    case RS_I16: { int16_t v; memcpy(&v, p, 2); return v; }
    case RS_I32: { int32_t v; memcpy(&v, p, 4); return v; }
    case RS_I64: { int64_t v; memcpy(&v, p, 8); return v; }
    case RS_U8:
    case RS_BOOL: { uint8_t v; memcpy(&v, p, 1); return v; }
    default: return 0;
    }
}

int tensor_view_expect_shape(const TensorView *view, const char *what, int ndim, const int64_t *shape)
{
    int ok = view->ndim == ndim;
    for (int d = 0; ok && d < ndim; d++)
        ok = view->shape[d] == shape[d];
    if (ok)
        return 0;
    char expected[96];
    int used = 0;
    for (int d = 0; d < ndim && used < (int)sizeof(expected); d++)
        used += snprintf(expected + used, sizeof(expected) - (size_t)used, "%s%lld", d ? ", " : "",
                         (long long)shape[d]);
    PyErr_Format(PyExc_ValueError, "%s must have shape (%s)", what, expected);
    return -1;
}
