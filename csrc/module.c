/*
 * rotalabs_steer._core: module definition (multi-phase init, per-module state) and
 * dlpack_info(), which reports what the DLPack reader sees in a tensor.
 */
#include "core.h"
#include "pair_moments.h"

int accumulator_numpy_import(void);

static struct PyModuleDef core_module;

static CoreState *get_state(PyObject *module)
{
    return (CoreState *)PyModule_GetState(module);
}

CoreState *core_state_from_type(PyTypeObject *type)
{
    PyObject *module = PyType_GetModuleByDef(type, &core_module);
    if (module == NULL)
        return NULL;
    return get_state(module);
}

PyDoc_STRVAR(dlpack_info_doc,
"dlpack_info(tensor, /)\n--\n\n"
"Import `tensor` through DLPack and describe it: a dict with dtype, shape, strides\n"
"(in elements), device_type and versioned. The producer's\n"
"deleter has run by the time this returns.");

static PyObject *dlpack_info(PyObject *module, PyObject *tensor)
{
    TensorView view;
    if (tensor_view_acquire(get_state(module), tensor, "tensor", &view) < 0)
        return NULL;
    PyObject *shape = PyTuple_New(view.ndim);
    PyObject *strides = PyTuple_New(view.ndim);
    PyObject *result = NULL;
    if (shape == NULL || strides == NULL)
        goto finally;
    for (int32_t d = 0; d < view.ndim; d++) {
        PyObject *n = PyLong_FromLongLong(view.shape[d]);
        PyObject *s = PyLong_FromLongLong(view.strides[d]);
        if (n == NULL || s == NULL) {
            Py_XDECREF(n);
            Py_XDECREF(s);
            goto finally;
        }
        PyTuple_SET_ITEM(shape, d, n);
        PyTuple_SET_ITEM(strides, d, s);
    }
    result = Py_BuildValue("{s:s,s:O,s:O,s:i,s:O}", "dtype", rs_dtype_name(view.dtype), "shape",
                           shape, "strides", strides, "device_type", view.device_type,
                           "versioned", view.versioned != NULL ? Py_True : Py_False);
finally:
    Py_XDECREF(shape);
    Py_XDECREF(strides);
    tensor_view_release(&view);
    return result;
}

static PyMethodDef core_methods[] = {
    {"dlpack_info", dlpack_info, METH_O, dlpack_info_doc},
    {NULL},
};

static int core_exec(PyObject *module)
{
    CoreState *state = get_state(module);
    if (accumulator_numpy_import() < 0)
        return -1;
    state->str_dlpack = PyUnicode_InternFromString("__dlpack__");
    state->str_dlpack_device = PyUnicode_InternFromString("__dlpack_device__");
    PyObject *max_version_name = PyUnicode_InternFromString("max_version");
    state->kwnames_max_version =
        max_version_name != NULL ? PyTuple_Pack(1, max_version_name) : NULL;
    Py_XDECREF(max_version_name);
    state->max_version = Py_BuildValue("(ii)", RS_DLPACK_MAJOR, RS_DLPACK_MINOR);
    if (state->str_dlpack == NULL || state->str_dlpack_device == NULL ||
        state->kwnames_max_version == NULL || state->max_version == NULL)
        return -1;
    state->accumulator_type =
        (PyTypeObject *)PyType_FromModuleAndSpec(module, &accumulator_spec, NULL);
    if (state->accumulator_type == NULL || PyModule_AddType(module, state->accumulator_type) < 0)
        return -1;
    state->capture_hook_type =
        (PyTypeObject *)PyType_FromModuleAndSpec(module, &capture_hook_spec, NULL);
    if (state->capture_hook_type == NULL || PyModule_AddType(module, state->capture_hook_type) < 0)
        return -1;
    if (pair_moments_add_type(module) < 0)
        return -1;
    /* A BaseException, like GeneratorExit and KeyboardInterrupt: it is a control-flow
     * signal, not an error, and must pass through user code (a wrapper or hook) that
     * handles failures with `except Exception:` up to the caller that expects it. */
    state->stop_forward = PyErr_NewExceptionWithDoc(
        "rotalabs_steer._core.StopForward",
        "Raised by the deepest CaptureHook to end a forward pass early; caught by the caller.\n\n"
        "It derives from BaseException, not Exception: it is a control-flow signal, so an\n"
        "`except Exception:` in a module or hook between the hook and the caller does not\n"
        "swallow it (which would run the rest of the model).",
        PyExc_BaseException, NULL);
    if (state->stop_forward == NULL ||
        PyModule_AddObjectRef(module, "StopForward", state->stop_forward) < 0)
        return -1;
    return 0;
}

static int core_traverse(PyObject *module, visitproc visit, void *arg)
{
    CoreState *state = get_state(module);
    Py_VISIT(state->accumulator_type);
    Py_VISIT(state->capture_hook_type);
    Py_VISIT(state->stop_forward);
    Py_VISIT(state->str_dlpack);
    Py_VISIT(state->str_dlpack_device);
    Py_VISIT(state->kwnames_max_version);
    Py_VISIT(state->max_version);
    return 0;
}

static int core_clear(PyObject *module)
{
    CoreState *state = get_state(module);
    Py_CLEAR(state->accumulator_type);
    Py_CLEAR(state->capture_hook_type);
    Py_CLEAR(state->stop_forward);
    Py_CLEAR(state->str_dlpack);
    Py_CLEAR(state->str_dlpack_device);
    Py_CLEAR(state->kwnames_max_version);
    Py_CLEAR(state->max_version);
    return 0;
}

static void core_free(void *module)
{
    core_clear((PyObject *)module);
}

static PyModuleDef_Slot core_slots[] = {
    {Py_mod_exec, core_exec},
#ifdef Py_mod_multiple_interpreters
    /* Our own state is per module, but import_array() fills NumPy's C-API table, a
     * process-wide static that points into the first interpreter's NumPy (which itself
     * does not support subinterpreters). */
    {Py_mod_multiple_interpreters, Py_MOD_MULTIPLE_INTERPRETERS_NOT_SUPPORTED},
#endif
#ifdef Py_mod_gil
    /* The Accumulator's busy flag is a plain int guarded by the GIL: not free-threading safe. */
    {Py_mod_gil, Py_MOD_GIL_USED},
#endif
    {0, NULL},
};

static struct PyModuleDef core_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "rotalabs_steer._core",
    .m_doc = "C core of rotalabs_steer: DLPack reader, row selection, float64 accumulation, "
             "forward hooks.",
    .m_size = sizeof(CoreState),
    .m_methods = core_methods,
    .m_slots = core_slots,
    .m_traverse = core_traverse,
    .m_clear = core_clear,
    .m_free = core_free,
};

PyMODINIT_FUNC PyInit__core(void)
{
    return PyModuleDef_Init(&core_module);
}
