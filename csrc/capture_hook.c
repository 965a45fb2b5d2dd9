/*
 * CaptureHook: the callable registered with nn.Module.register_forward_hook on a
 * decoder block. It hands the block output straight to its Accumulator (no Python
 * per row, no copy of [batch, seq, hidden]) and, on the deepest requested block,
 * raises StopForward so the rest of the model and the LM head never run.
 *
 * Tensors the CPU cannot read (CUDA, MPS, ...) go to `device_rows`, a Python callable
 * that selects rows on the device and keeps them for one host transfer per batch.
 */
#include "core.h"

#include <stddef.h>

typedef struct {
    PyObject_HEAD
    PyObject *accumulator;
    Py_ssize_t slot;
    char stop; /* a char, the C type behind Py_T_BOOL */
    PyObject *device_rows; /* callable(slot, tensor) or None */
    Py_ssize_t calls;
    vectorcallfunc vectorcall; /* torch calls hooks positionally: no args tuple per call */
} CaptureHook;

static PyObject *CaptureHook_vectorcall(PyObject *op, PyObject *const *args, size_t nargsf,
                                        PyObject *kwnames);

static PyObject *CaptureHook_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    static char *keywords[] = {"accumulator", "slot", "stop", "device_rows", NULL};
    PyObject *accumulator, *device_rows = Py_None;
    Py_ssize_t slot;
    int stop = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "On|$pO:CaptureHook", keywords, &accumulator,
                                     &slot, &stop, &device_rows))
        return NULL;
    CoreState *state = core_state_from_type(type);
    if (state == NULL)
        return NULL;
    if (!accumulator_check(accumulator, state->accumulator_type)) {
        PyErr_Format(PyExc_TypeError, "accumulator must be an Accumulator, not %.200s",
                     Py_TYPE(accumulator)->tp_name);
        return NULL;
    }
    if (device_rows != Py_None && !PyCallable_Check(device_rows)) {
        PyErr_SetString(PyExc_TypeError, "device_rows must be callable or None");
        return NULL;
    }
    CaptureHook *self = (CaptureHook *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    self->accumulator = Py_NewRef(accumulator);
    self->slot = slot;
    self->stop = (char)stop;
    self->device_rows = Py_NewRef(device_rows);
    self->vectorcall = CaptureHook_vectorcall;
    return (PyObject *)self;
}

static int CaptureHook_traverse(PyObject *op, visitproc visit, void *arg)
{
    CaptureHook *self = (CaptureHook *)op;
    Py_VISIT(Py_TYPE(self));
    Py_VISIT(self->accumulator);
    Py_VISIT(self->device_rows);
    return 0;
}

static int CaptureHook_clear(PyObject *op)
{
    CaptureHook *self = (CaptureHook *)op;
    Py_CLEAR(self->accumulator);
    Py_CLEAR(self->device_rows);
    return 0;
}

static void CaptureHook_dealloc(PyObject *op)
{
    PyTypeObject *type = Py_TYPE(op);
    PyObject_GC_UnTrack(op);
    CaptureHook_clear(op);
    type->tp_free(op);
    Py_DECREF(type);
}

/* 1 when the CPU can read `tensor` directly (or the DLPack reader should judge it: a bare
 * capsule, or an object without __dlpack_device__), 0 when not, -1 on error. */
static int host_readable(CoreState *state, PyObject *tensor)
{
    if (PyCapsule_CheckExact(tensor))
        return 1;
    /* Not PyObject_VectorcallMethod: a missing method means "let the reader judge", while
     * an AttributeError raised inside __dlpack_device__ must propagate. */
    PyObject *method = PyObject_GetAttr(tensor, state->str_dlpack_device);
    if (method == NULL) {
        if (!PyErr_ExceptionMatches(PyExc_AttributeError))
            return -1;
        PyErr_Clear();
        return 1;
    }
    PyObject *device = PyObject_CallNoArgs(method);
    Py_DECREF(method);
    if (device == NULL)
        return -1;
    if (!PyTuple_Check(device) || PyTuple_GET_SIZE(device) < 1) {
        PyErr_Format(PyExc_TypeError, "__dlpack_device__() returned %.200s, not a (type, id) tuple",
                     Py_TYPE(device)->tp_name);
        Py_DECREF(device);
        return -1;
    }
    long device_type = PyLong_AsLong(PyTuple_GET_ITEM(device, 0));
    Py_DECREF(device);
    if (device_type == -1 && PyErr_Occurred())
        return -1;
    return device_type == kDLCPU || device_type == kDLCUDAHost || device_type == kDLCUDAManaged;
}

/* Hands a tensor the CPU cannot read to device_rows(slot, tensor). */
static int route_to_device_rows(CaptureHook *self, PyObject *tensor)
{
    PyObject *slot = PyLong_FromSsize_t(self->slot);
    if (slot == NULL)
        return -1;
    PyObject *args[3] = {NULL, slot, tensor}; /* args[0]: scratch for the callee */
    PyObject *r = PyObject_Vectorcall(self->device_rows, args + 1,
                                      2 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
    Py_DECREF(slot);
    if (r == NULL)
        return -1;
    Py_DECREF(r);
    return 0;
}

/* hook(module, args, output) or hook(module, args, kwargs, output): output is last. */
static PyObject *CaptureHook_vectorcall(PyObject *op, PyObject *const *args, size_t nargsf,
                                        PyObject *kwnames)
{
    CaptureHook *self = (CaptureHook *)op;
    if (kwnames != NULL && PyTuple_GET_SIZE(kwnames) != 0) {
        PyErr_SetString(PyExc_TypeError, "CaptureHook takes positional arguments only");
        return NULL;
    }
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    if (nargs != 3 && nargs != 4) {
        PyErr_Format(PyExc_TypeError,
                     "CaptureHook expects (module, args, output) or (module, args, kwargs, "
                     "output), got %zd arguments",
                     nargs);
        return NULL;
    }
    CoreState *state = core_state_from_type(Py_TYPE(self));
    if (state == NULL)
        return NULL;
    self->calls++;
    PyObject *output = args[nargs - 1];
    PyObject *activations = output;
    if (PyTuple_Check(output) || PyList_Check(output)) {
        if (PySequence_Fast_GET_SIZE(output) == 0) {
            PyErr_SetString(PyExc_ValueError, "the hooked module returned an empty tuple");
            return NULL;
        }
        activations = PySequence_Fast_GET_ITEM(output, 0);
    }
    /* Own it: the Python code called below (__dlpack__, device_rows) may drop the list. */
    Py_INCREF(activations);
    PyObject *result = NULL;
    int direct = 1;
    if (self->device_rows != Py_None && (direct = host_readable(state, activations)) < 0)
        goto finally;
    if (direct) {
        if (accumulator_add_batch(self->accumulator, self->slot, activations) < 0)
            goto finally;
    }
    else if (route_to_device_rows(self, activations) < 0) {
        goto finally;
    }
    if (self->stop) {
        PyErr_SetString(state->stop_forward, "forward stopped after the deepest hooked block");
        goto finally;
    }
    result = Py_NewRef(Py_None);
finally:
    Py_DECREF(activations);
    return result;
}

static PyMemberDef CaptureHook_members[] = {
    {"calls", Py_T_PYSSIZET, offsetof(CaptureHook, calls), Py_READONLY,
     "How many times the hook has run."},
    {"slot", Py_T_PYSSIZET, offsetof(CaptureHook, slot), Py_READONLY,
     "The accumulator slot this hook fills."},
    {"stop", Py_T_BOOL, offsetof(CaptureHook, stop), Py_READONLY,
     "Whether the hook ends the forward."},
    {"accumulator", Py_T_OBJECT_EX, offsetof(CaptureHook, accumulator), Py_READONLY,
     "The Accumulator fed."},
    /* How PyType_FromSpec learns where the instance's vectorcall pointer lives. */
    {"__vectorcalloffset__", Py_T_PYSSIZET, offsetof(CaptureHook, vectorcall), Py_READONLY, NULL},
    {NULL},
};

PyDoc_STRVAR(CaptureHook_doc,
"CaptureHook(accumulator, slot, *, stop=False, device_rows=None)\n--\n\n"
"Forward hook that adds a block's output to `accumulator` slot `slot` with the\n"
"accumulator's current batch plan, then raises StopForward when `stop` is true.");

static PyType_Slot CaptureHook_slots[] = {
    {Py_tp_new, CaptureHook_new},
    {Py_tp_dealloc, CaptureHook_dealloc},
    {Py_tp_traverse, CaptureHook_traverse},
    {Py_tp_clear, CaptureHook_clear},
    {Py_tp_call, PyVectorcall_Call},
    {Py_tp_members, CaptureHook_members},
    {Py_tp_doc, (void *)CaptureHook_doc},
    {0, NULL},
};

PyType_Spec capture_hook_spec = {
    .name = "rotalabs_steer._core.CaptureHook",
    .basicsize = sizeof(CaptureHook),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_IMMUTABLETYPE |
             Py_TPFLAGS_HAVE_VECTORCALL,
    .slots = CaptureHook_slots,
};
