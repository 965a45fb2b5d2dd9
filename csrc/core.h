/*
 * Declarations shared by the C files of rotalabs_steer._core.
 *
 *   tensor_view.c   DLPack import: any producer's tensor as a host-readable view
 *   row_plan.c      which rows of a batch go where (groups, token index or mask)
 *   reduce.c        dtype-specific row sums into float64 (no Python, no GIL)
 *   accumulator.c   the Accumulator type: per-slot float64 sums and counts
 *   capture_hook.c  the CaptureHook type: a forward hook feeding an Accumulator
 *   module.c        module state, init, and the small module-level functions
 */
#ifndef ROTALABS_STEER_CORE_H
#define ROTALABS_STEER_CORE_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

#include "dlpack.h"

/* ------------------------------------------------------------------ compat */

/* PyMemberDef type codes got public Py_-prefixed names in 3.12; 3.11 has only the
 * structmember.h spellings. */
#if PY_VERSION_HEX < 0x030C0000
#include <structmember.h>
#define Py_T_PYSSIZET T_PYSSIZET
#define Py_T_BOOL T_BOOL
#define Py_T_OBJECT_EX T_OBJECT_EX
#define Py_READONLY READONLY
#endif

/* PyErr_Fetch/PyErr_Restore are deprecated since 3.12; on 3.11 the single-object API
 * is built from them so that every call site uses the modern form. */
#if PY_VERSION_HEX < 0x030C0000
static inline PyObject *PyErr_GetRaisedException(void)
{
    PyObject *type, *value, *traceback;
    PyErr_Fetch(&type, &value, &traceback);
    if (type == NULL)
        return NULL;
    PyErr_NormalizeException(&type, &value, &traceback);
    if (value != NULL && traceback != NULL)
        PyException_SetTraceback(value, traceback);
    Py_DECREF(type);
    Py_XDECREF(traceback);
    return value;
}

static inline void PyErr_SetRaisedException(PyObject *exc)
{
    if (exc == NULL) {
        PyErr_Clear();
        return;
    }
    PyErr_Restore(Py_NewRef(Py_TYPE(exc)), exc, PyException_GetTraceback(exc));
}
#endif

/* ------------------------------------------------------------------ module */

typedef struct {
    PyTypeObject *accumulator_type;
    PyTypeObject *capture_hook_type;
    PyObject *stop_forward; /* exception class raised to end a forward early */
    /* Made once at import so the per-batch DLPack path builds no strings, tuples or dicts. */
    PyObject *str_dlpack;          /* "__dlpack__" (interned) */
    PyObject *str_dlpack_device;   /* "__dlpack_device__" (interned) */
    PyObject *kwnames_max_version; /* ("max_version",): kwnames for the vectorcall */
    PyObject *max_version;         /* (RS_DLPACK_MAJOR, RS_DLPACK_MINOR) */
} CoreState;

/* State of the module that defined `type`; NULL with an error set if there is none. */
CoreState *core_state_from_type(PyTypeObject *type);

/* ------------------------------------------------------------- tensor view */

#define RS_MAX_NDIM 8

typedef enum {
    RS_F16,
    RS_BF16,
    RS_F32,
    RS_F64,
    RS_I8,
    RS_I16,
    RS_I32,
    RS_I64,
    RS_U8,
    RS_BOOL,
} RsDtype;

/* A borrowed DLPack tensor, owned until tensor_view_release(). */
typedef struct {
    const char *data;          /* data + byte_offset; may be NULL when numel == 0 */
    int32_t ndim;
    int64_t shape[RS_MAX_NDIM];
    int64_t strides[RS_MAX_NDIM]; /* in elements, filled in when the producer gave NULL */
    int64_t numel;
    RsDtype dtype;
    int itemsize;
    int device_type;
    /* ownership: exactly one of the two managed pointers is set once owned */
    DLManagedTensorVersioned *versioned;
    DLManagedTensor *legacy;
} TensorView;

/* Fills `view` from an object with __dlpack__ (or a DLPack capsule). Returns 0, or -1
 * with an exception set and nothing left to release. `what` names the argument in errors. */
int tensor_view_acquire(CoreState *state, PyObject *obj, const char *what, TensorView *view);
/* 0 if `view` has exactly the `ndim` sizes in `shape` (ndim 1 to 3), else -1 with a ValueError
 * naming `what` and the expected shape. */
int tensor_view_expect_shape(const TensorView *view, const char *what, int ndim, const int64_t *shape);
/* Calls the producer's deleter exactly once; safe on a zeroed view. GIL held. */
void tensor_view_release(TensorView *view);
int tensor_view_is_float(const TensorView *view);
const char *rs_dtype_name(RsDtype dtype);
/* Reads element `offset` (in elements from view->data) of an integer or bool view. */
int64_t tensor_view_int_at(const TensorView *view, int64_t offset);

/* ---------------------------------------------------------------- row plan */

/* Which rows of an activation batch feed which group, and which tokens of each row. */
typedef enum { RS_ROWS = 0, RS_INDEX = 1, RS_MASK = 2 } RsSelect;

typedef struct {
    RsSelect select;
    int64_t rows;
    int64_t seq;            /* mask width; 0 unless RS_MASK */
    int64_t *groups;        /* [rows], -1 skips a row */
    int64_t *index;         /* [rows], RS_INDEX only */
    uint8_t *mask;          /* [rows * seq], RS_MASK only */
    int64_t *mask_tokens;   /* [rows], number of set mask entries per row */
} RowPlan;

/* Builds a plan from Python objects (index and mask may be Py_None / NULL). */
int row_plan_build(CoreState *state, RowPlan *plan, PyObject *groups, PyObject *index,
                   PyObject *mask, int64_t num_groups);
void row_plan_free(RowPlan *plan);
/* Checks an activation view against a plan: shapes, index range, hidden size. */
int row_plan_check(const RowPlan *plan, const TensorView *act, int64_t hidden);

/* ------------------------------------------------------------------ reduce */

/* A uniform reservoir sample of one slot's selected rows (for separation metrics):
 * bounded memory whatever the number of rows offered. */
typedef struct {
    int64_t capacity; /* 0 disables sampling */
    int64_t *seen;    /* rows offered so far */
    double *rows;     /* [capacity][hidden] */
    int64_t *groups;  /* [capacity] */
    uint64_t *rng;    /* generator state, shared by the accumulator's slots */
} RowSample;

/* Adds the selected rows of `act` into sums[group * hidden + h] (float64) and counts[group],
 * and offers each row to `sample`. `scratch` holds `hidden` doubles. Pure C: called with the
 * GIL released after row_plan_check() succeeded. */
void reduce_rows(const TensorView *act, const RowPlan *plan, int64_t hidden,
                 double *sums, int64_t *counts, double *scratch, const RowSample *sample);

/* ------------------------------------------------------------- accumulator */

extern PyType_Spec accumulator_spec;
/* Adds `activations` for `slot` using the batch set by Accumulator.set_batch. */
int accumulator_add_batch(PyObject *self, Py_ssize_t slot, PyObject *activations);
int accumulator_check(PyObject *obj, PyTypeObject *type);

/* ------------------------------------------------------------ capture hook */

extern PyType_Spec capture_hook_spec;

#endif /* ROTALABS_STEER_CORE_H */
