/*
 * RowPlan: the per-batch description of which rows feed which group (positive,
 * negative, or skipped) and which tokens of each row are read. Built once per batch
 * with the GIL held, then read by every layer's reduction without it.
 */
#include "core.h"

#include <stdlib.h>
#include <string.h>

void row_plan_free(RowPlan *plan)
{
    PyMem_RawFree(plan->groups);
    PyMem_RawFree(plan->index);
    PyMem_RawFree(plan->mask);
    PyMem_RawFree(plan->mask_tokens);
    memset(plan, 0, sizeof(*plan));
}

/* Acquires an integer/bool view with the expected ndim, or fails naming `what`. */
static int acquire_integer(CoreState *state, PyObject *obj, const char *what, int ndim,
                           TensorView *view)
{
    if (tensor_view_acquire(state, obj, what, view) < 0)
        return -1;
    if (tensor_view_is_float(view)) {
        PyErr_Format(PyExc_TypeError, "%s must hold integers or bools, not %s", what,
                     rs_dtype_name(view->dtype));
        goto error;
    }
    if (view->ndim != ndim) {
        PyErr_Format(PyExc_ValueError, "%s must be %d-dimensional, got %d dimensions", what,
                     ndim, (int)view->ndim);
        goto error;
    }
    return 0;
error:
    tensor_view_release(view);
    return -1;
}

static int64_t *alloc_int64(int64_t n)
{
    int64_t *p = PyMem_RawMalloc((size_t)(n > 0 ? n : 1) * sizeof(int64_t));
    if (p == NULL)
        PyErr_NoMemory();
    return p;
}

static int read_groups(CoreState *state, RowPlan *plan, PyObject *groups, int64_t num_groups)
{
    TensorView view;
    if (acquire_integer(state, groups, "groups", 1, &view) < 0)
        return -1;
    plan->rows = view.shape[0];
    plan->groups = alloc_int64(plan->rows);
    int status = plan->groups != NULL ? 0 : -1;
    for (int64_t b = 0; status == 0 && b < plan->rows; b++) {
        int64_t g = tensor_view_int_at(&view, b * view.strides[0]);
        if (g < -1 || g >= num_groups) {
            PyErr_Format(PyExc_ValueError,
                         "groups[%lld] is %lld; expected -1 (skip) or a group in [0, %lld)",
                         (long long)b, (long long)g, (long long)num_groups);
            status = -1;
        }
        else {
            plan->groups[b] = g;
        }
    }
    tensor_view_release(&view);
    return status;
}

static int read_index(CoreState *state, RowPlan *plan, PyObject *index)
{
    TensorView view;
    if (acquire_integer(state, index, "index", 1, &view) < 0)
        return -1;
    int status = 0;
    if (view.shape[0] != plan->rows) {
        PyErr_Format(PyExc_ValueError, "index has %lld entries but groups has %lld rows",
                     (long long)view.shape[0], (long long)plan->rows);
        status = -1;
    }
    else if ((plan->index = alloc_int64(plan->rows)) == NULL) {
        status = -1;
    }
    for (int64_t b = 0; status == 0 && b < plan->rows; b++)
        plan->index[b] = tensor_view_int_at(&view, b * view.strides[0]);
    tensor_view_release(&view);
    plan->select = RS_INDEX;
    return status;
}

static int read_mask(CoreState *state, RowPlan *plan, PyObject *mask)
{
    TensorView view;
    if (acquire_integer(state, mask, "mask", 2, &view) < 0)
        return -1;
    int status = 0;
    plan->select = RS_MASK;
    plan->seq = view.shape[1];
    if (view.shape[0] != plan->rows) {
        PyErr_Format(PyExc_ValueError, "mask has %lld rows but groups has %lld",
                     (long long)view.shape[0], (long long)plan->rows);
        status = -1;
    }
    else if (plan->seq > 0 && plan->rows > INT64_MAX / plan->seq) {
        PyErr_SetString(PyExc_ValueError, "mask is too large");
        status = -1;
    }
    else {
        plan->mask = PyMem_RawMalloc((size_t)(plan->rows * plan->seq > 0 ? plan->rows * plan->seq : 1));
        plan->mask_tokens = alloc_int64(plan->rows);
        if (plan->mask == NULL || plan->mask_tokens == NULL) {
            PyErr_NoMemory();
            status = -1;
        }
    }
    for (int64_t b = 0; status == 0 && b < plan->rows; b++) {
        int64_t tokens = 0;
        for (int64_t s = 0; s < plan->seq; s++) {
            int64_t offset = b * view.strides[0] + s * view.strides[1];
            uint8_t on = tensor_view_int_at(&view, offset) != 0;
            plan->mask[b * plan->seq + s] = on;
            tokens += on;
        }
        plan->mask_tokens[b] = tokens;
        if (tokens == 0 && plan->groups[b] >= 0) {
            PyErr_Format(PyExc_ValueError,
                         "mask row %lld selects no token; a row without tokens cannot be averaged",
                         (long long)b);
            status = -1;
        }
    }
    tensor_view_release(&view);
    return status;
}

int row_plan_build(CoreState *state, RowPlan *plan, PyObject *groups, PyObject *index,
                   PyObject *mask, int64_t num_groups)
{
    memset(plan, 0, sizeof(*plan));
    if (index == Py_None)
        index = NULL;
    if (mask == Py_None)
        mask = NULL;
    if (index != NULL && mask != NULL) {
        PyErr_SetString(PyExc_ValueError, "pass index or mask, not both");
        return -1;
    }
    if (read_groups(state, plan, groups, num_groups) < 0)
        goto error;
    if (index != NULL && read_index(state, plan, index) < 0)
        goto error;
    if (mask != NULL && read_mask(state, plan, mask) < 0)
        goto error;
    return 0;
error:
    row_plan_free(plan);
    return -1;
}

int row_plan_check(const RowPlan *plan, const TensorView *act, int64_t hidden)
{
    if (!tensor_view_is_float(act)) {
        PyErr_Format(PyExc_TypeError,
                     "activations must be float16, bfloat16, float32 or float64, not %s",
                     rs_dtype_name(act->dtype));
        return -1;
    }
    int want_ndim = plan->select == RS_ROWS ? 2 : 3;
    if (act->ndim != want_ndim) {
        PyErr_Format(PyExc_ValueError,
                     "activations must be %s, got %d dimensions",
                     want_ndim == 2 ? "[rows, hidden] (no index or mask given)"
                                    : "[batch, seq, hidden]",
                     (int)act->ndim);
        return -1;
    }
    if (act->shape[0] != plan->rows) {
        PyErr_Format(PyExc_ValueError, "activations have %lld rows but the batch has %lld",
                     (long long)act->shape[0], (long long)plan->rows);
        return -1;
    }
    if (act->shape[want_ndim - 1] != hidden) {
        PyErr_Format(PyExc_ValueError,
                     "activations have hidden size %lld but the accumulator expects %lld",
                     (long long)act->shape[want_ndim - 1], (long long)hidden);
        return -1;
    }
    if (plan->select == RS_MASK && act->shape[1] != plan->seq) {
        PyErr_Format(PyExc_ValueError,
                     "activations have sequence length %lld but the mask has %lld",
                     (long long)act->shape[1], (long long)plan->seq);
        return -1;
    }
    if (plan->select == RS_INDEX) {
        for (int64_t b = 0; b < plan->rows; b++) {
            if (plan->groups[b] >= 0 && (plan->index[b] < 0 || plan->index[b] >= act->shape[1])) {
                PyErr_Format(PyExc_IndexError,
                             "index[%lld] is %lld, outside the sequence length %lld",
                             (long long)b, (long long)plan->index[b], (long long)act->shape[1]);
                return -1;
            }
        }
    }
    return 0;
}
