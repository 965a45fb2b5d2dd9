/*
 * PairMoments: per slot (hooked layer), the float64 count N, sum S = sum d and second
 * moment M = sum d d^T of paired differences d = row(positive) - row(negative). Every
 * extraction method (mean, uncentred PCA, PCA of the centred differences, Fisher) is a
 * function of (N, S, M), and all three merge by addition, so batching, resuming and
 * all-reduce across processes are exact. Memory is O(slots * hidden^2) whatever the
 * number of pairs.
 *
 * Only the upper triangle of M is updated (a rank-k update per call, GIL released);
 * state() mirrors it into a full symmetric matrix. A busy flag, touched only with the
 * GIL held, refuses a second thread while an update is in flight, as in accumulator.c.
 */
#include "pair_moments.h"

#define NPY_NO_DEPRECATED_API NPY_1_7_API_VERSION
#include <numpy/arrayobject.h>

#include <stddef.h>
#include <string.h>

typedef struct {
    PyObject_HEAD
    /* Py_ssize_t (not int64_t) so that PyMemberDef can expose them as Py_T_PYSSIZET. */
    Py_ssize_t num_slots;
    Py_ssize_t hidden;
    int64_t *counts;  /* [num_slots] pairs added */
    double *sums;     /* [num_slots][hidden] */
    double *moments;  /* [num_slots][hidden][hidden], upper triangle maintained */
    int busy;
} PairMoments;

static int enter(PairMoments *self)
{
    if (self->busy) {
        PyErr_SetString(PyExc_RuntimeError,
                        "PairMoments is already in use (by another thread); give each thread its own");
        return -1;
    }
    self->busy = 1;
    return 0;
}

static int64_t moment_size(const PairMoments *self)
{
    return self->num_slots * self->hidden * self->hidden;
}

/* ------------------------------------------------------------ construction */

static PyObject *PairMoments_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    static char *keywords[] = {"num_slots", "hidden", NULL};
    Py_ssize_t num_slots, hidden;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "nn:PairMoments", keywords, &num_slots, &hidden))
        return NULL;
    if (num_slots < 1 || hidden < 1) {
        PyErr_Format(PyExc_ValueError, "num_slots and hidden must be >= 1 (got %zd, %zd)",
                     num_slots, hidden);
        return NULL;
    }
    if (hidden > (PY_SSIZE_T_MAX / 16) / hidden / num_slots) {
        PyErr_SetString(PyExc_OverflowError, "PairMoments state would be too large");
        return NULL;
    }
    PairMoments *self = (PairMoments *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    self->num_slots = num_slots;
    self->hidden = hidden;
    self->counts = PyMem_RawCalloc((size_t)num_slots, sizeof(int64_t));
    self->sums = PyMem_RawCalloc((size_t)(num_slots * hidden), sizeof(double));
    /* calloc: the OS hands out zero pages lazily, so a large M costs nothing until used */
    self->moments = PyMem_RawCalloc((size_t)moment_size(self), sizeof(double));
    if (self->counts == NULL || self->sums == NULL || self->moments == NULL) {
        Py_DECREF(self);
        return PyErr_NoMemory();
    }
    return (PyObject *)self;
}

static void PairMoments_dealloc(PyObject *op)
{
    PairMoments *self = (PairMoments *)op;
    PyTypeObject *type = Py_TYPE(op);
    PyMem_RawFree(self->counts);
    PyMem_RawFree(self->sums);
    PyMem_RawFree(self->moments);
    type->tp_free(op);
    Py_DECREF(type);
}

/* ------------------------------------------------------------------ update */

static double read_float(const TensorView *view, int64_t offset)
{
    if (view->dtype == RS_F64) {
        double v;
        memcpy(&v, view->data + offset * 8, 8);
        return v;
    }
    float v;
    memcpy(&v, view->data + offset * 4, 4);
    return (double)v;
}

/* Reads an int index vector of length `count` into `out`, each in [0, limit). */
static int read_indices(const TensorView *view, const char *what, int64_t count, int64_t limit,
                        int64_t *out)
{
    if (tensor_view_is_float(view) || view->dtype == RS_BOOL) {
        PyErr_Format(PyExc_TypeError, "%s must hold integers, not %s", what,
                     rs_dtype_name(view->dtype));
        return -1;
    }
    for (int64_t i = 0; i < count; i++) {
        int64_t v = tensor_view_int_at(view, i * view->strides[0]);
        if (v < 0 || v >= limit) {
            PyErr_Format(PyExc_IndexError, "%s[%lld] = %lld is out of range for %lld rows", what,
                         (long long)i, (long long)v, (long long)limit);
            return -1;
        }
        out[i] = v;
    }
    return 0;
}

/* Pure C, no GIL: d_p = rows[pos[p]] - rows[neg[p]] into `diffs`, then S += sum d_p and
 * M[i, j>=i] += sum_p d_p[i] d_p[j]. Row i of M stays in cache over all k pairs. */
static void rank_k_update(const TensorView *rows, const int64_t *pos, const int64_t *neg,
                          int64_t k, int64_t hidden, double *diffs, double *sums, double *moments)
{
    int64_t row_stride = rows->strides[0], col_stride = rows->strides[1];
    for (int64_t p = 0; p < k; p++) {
        double *d = diffs + p * hidden;
        for (int64_t h = 0; h < hidden; h++) {
            d[h] = read_float(rows, pos[p] * row_stride + h * col_stride) -
                   read_float(rows, neg[p] * row_stride + h * col_stride);
            sums[h] += d[h];
        }
    }
    for (int64_t i = 0; i < hidden; i++) {
        double *m = moments + i * hidden;
        for (int64_t p = 0; p < k; p++) {
            const double *d = diffs + p * hidden;
            double a = d[i];
            if (a == 0.0)
                continue;
            for (int64_t j = i; j < hidden; j++)
                m[j] += a * d[j];
        }
    }
}

PyDoc_STRVAR(add_doc,
"add($self, /, slot, rows, pos_index, neg_index)\n--\n\n"
"Add the pairs (rows[pos_index[p]], rows[neg_index[p]]) to slot `slot`.\n\n"
"rows: float32/float64 [n, hidden] (any DLPack producer readable from the CPU).\n"
"pos_index, neg_index: integer [k], row numbers of each pair's positive and negative.");

static PyObject *PairMoments_add(PyObject *op, PyObject *args, PyObject *kwargs)
{
    PairMoments *self = (PairMoments *)op;
    static char *keywords[] = {"slot", "rows", "pos_index", "neg_index", NULL};
    Py_ssize_t slot;
    PyObject *rows_obj, *pos_obj, *neg_obj;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "nOOO:add", keywords, &slot, &rows_obj, &pos_obj,
                                     &neg_obj))
        return NULL;
    if (slot < 0 || slot >= self->num_slots) {
        PyErr_Format(PyExc_IndexError, "slot %zd is out of range for %lld slots", slot,
                     (long long)self->num_slots);
        return NULL;
    }
    if (enter(self) < 0)
        return NULL;
    CoreState *state = core_state_from_type(Py_TYPE((PyObject *)self));
    TensorView rows = {0}, pos_view = {0}, neg_view = {0};
    int64_t *index = NULL;
    double *diffs = NULL;
    PyObject *result = NULL;
    if (tensor_view_acquire(state, rows_obj, "rows", &rows) < 0 ||
        tensor_view_acquire(state, pos_obj, "pos_index", &pos_view) < 0 ||
        tensor_view_acquire(state, neg_obj, "neg_index", &neg_view) < 0)
        goto finally;
    if (rows.dtype != RS_F32 && rows.dtype != RS_F64) {
        PyErr_Format(PyExc_TypeError, "rows must be float32 or float64, not %s",
                     rs_dtype_name(rows.dtype));
        goto finally;
    }
    if (rows.ndim != 2 || rows.shape[1] != self->hidden) {
        PyErr_Format(PyExc_ValueError, "rows must have shape (n, %lld)", (long long)self->hidden);
        goto finally;
    }
    if (pos_view.ndim != 1 || neg_view.ndim != 1 || pos_view.shape[0] != neg_view.shape[0]) {
        PyErr_SetString(PyExc_ValueError,
                        "pos_index and neg_index must be 1-D and of the same length");
        goto finally;
    }
    int64_t k = pos_view.shape[0];
    index = PyMem_RawMalloc((size_t)(2 * k + 1) * sizeof(int64_t));
    diffs = PyMem_RawMalloc((size_t)(k * self->hidden + 1) * sizeof(double));
    if (index == NULL || diffs == NULL) {
        PyErr_NoMemory();
        goto finally;
    }
    if (read_indices(&pos_view, "pos_index", k, rows.shape[0], index) < 0 ||
        read_indices(&neg_view, "neg_index", k, rows.shape[0], index + k) < 0)
        goto finally;
    {
        int64_t hidden = self->hidden;
        double *sums = self->sums + slot * hidden;
        double *moments = self->moments + slot * hidden * hidden;
        Py_BEGIN_ALLOW_THREADS
        rank_k_update(&rows, index, index + k, k, hidden, diffs, sums, moments);
        Py_END_ALLOW_THREADS
        self->counts[slot] += k;
    }
    result = Py_NewRef(Py_None);
finally:
    PyMem_RawFree(index);
    PyMem_RawFree(diffs);
    tensor_view_release(&rows);
    tensor_view_release(&pos_view);
    tensor_view_release(&neg_view);
    self->busy = 0;
    return result;
}

/* ------------------------------------------------------------------- state */

PyDoc_STRVAR(state_doc,
"state($self, /)\n--\n\n"
"Return (counts, sums, moments) as new NumPy arrays: int64 [slots], float64\n"
"[slots, hidden] and float64 [slots, hidden, hidden] (symmetric).");

static PyObject *PairMoments_state(PyObject *op, PyObject *Py_UNUSED(ignored))
{
    PairMoments *self = (PairMoments *)op;
    if (enter(self) < 0)
        return NULL;
    int64_t hidden = self->hidden;
    npy_intp count_dims[1] = {self->num_slots};
    npy_intp sum_dims[2] = {self->num_slots, hidden};
    npy_intp moment_dims[3] = {self->num_slots, hidden, hidden};
    PyObject *counts = PyArray_SimpleNew(1, count_dims, NPY_INT64);
    PyObject *sums = PyArray_SimpleNew(2, sum_dims, NPY_FLOAT64);
    PyObject *moments = PyArray_SimpleNew(3, moment_dims, NPY_FLOAT64);
    PyObject *result = NULL;
    if (counts != NULL && sums != NULL && moments != NULL) {
        memcpy(PyArray_DATA((PyArrayObject *)counts), self->counts,
               (size_t)self->num_slots * sizeof(int64_t));
        memcpy(PyArray_DATA((PyArrayObject *)sums), self->sums,
               (size_t)(self->num_slots * hidden) * sizeof(double));
        double *out = PyArray_DATA((PyArrayObject *)moments);
        for (int64_t s = 0; s < self->num_slots; s++) {
            const double *m = self->moments + s * hidden * hidden;
            double *o = out + s * hidden * hidden;
            for (int64_t i = 0; i < hidden; i++)
                for (int64_t j = i; j < hidden; j++)
                    o[i * hidden + j] = o[j * hidden + i] = m[i * hidden + j];
        }
        result = PyTuple_Pack(3, counts, sums, moments);
    }
    Py_XDECREF(counts);
    Py_XDECREF(sums);
    Py_XDECREF(moments);
    self->busy = 0;
    return result;
}

PyDoc_STRVAR(load_state_doc,
"load_state($self, counts, sums, moments, /)\n--\n\n"
"Replace the state with `counts` (integer [slots]), `sums` (float64 [slots, hidden])\n"
"and `moments` (float64 [slots, hidden, hidden]; its upper triangle is used), e.g.\n"
"after an all-reduce across processes.");

static PyObject *PairMoments_load_state(PyObject *op, PyObject *args)
{
    PairMoments *self = (PairMoments *)op;
    PyObject *counts_obj, *sums_obj, *moments_obj;
    if (!PyArg_ParseTuple(args, "OOO:load_state", &counts_obj, &sums_obj, &moments_obj))
        return NULL;
    if (enter(self) < 0)
        return NULL;
    CoreState *state = core_state_from_type(Py_TYPE((PyObject *)self));
    TensorView counts = {0}, sums = {0}, moments = {0};
    PyObject *result = NULL;
    int64_t hidden = self->hidden;
    int64_t count_shape[1] = {self->num_slots};
    int64_t sum_shape[2] = {self->num_slots, hidden};
    int64_t moment_shape[3] = {self->num_slots, hidden, hidden};
    if (tensor_view_acquire(state, counts_obj, "counts", &counts) < 0 ||
        tensor_view_acquire(state, sums_obj, "sums", &sums) < 0 ||
        tensor_view_acquire(state, moments_obj, "moments", &moments) < 0)
        goto finally;
    if (tensor_view_is_float(&counts) || counts.dtype == RS_BOOL) {
        PyErr_Format(PyExc_TypeError, "counts must be integers, not %s",
                     rs_dtype_name(counts.dtype));
        goto finally;
    }
    if (sums.dtype != RS_F64 || moments.dtype != RS_F64) {
        PyErr_Format(PyExc_TypeError, "sums and moments must be float64, not %s and %s",
                     rs_dtype_name(sums.dtype), rs_dtype_name(moments.dtype));
        goto finally;
    }
    if (tensor_view_expect_shape(&counts, "counts", 1, count_shape) < 0 ||
        tensor_view_expect_shape(&sums, "sums", 2, sum_shape) < 0 ||
        tensor_view_expect_shape(&moments, "moments", 3, moment_shape) < 0)
        goto finally;
    /* Check every count before writing any: an error leaves the state as it was. */
    for (int64_t s = 0; s < self->num_slots; s++) {
        if (tensor_view_int_at(&counts, s * counts.strides[0]) < 0) {
            PyErr_Format(PyExc_ValueError, "counts[%lld] is negative", (long long)s);
            goto finally;
        }
    }
    for (int64_t s = 0; s < self->num_slots; s++) {
        self->counts[s] = tensor_view_int_at(&counts, s * counts.strides[0]);
        for (int64_t i = 0; i < hidden; i++) {
            self->sums[s * hidden + i] = read_float(&sums, s * sums.strides[0] + i * sums.strides[1]);
            for (int64_t j = i; j < hidden; j++)
                self->moments[(s * hidden + i) * hidden + j] = read_float(
                    &moments,
                    s * moments.strides[0] + i * moments.strides[1] + j * moments.strides[2]);
        }
    }
    result = Py_NewRef(Py_None);
finally:
    tensor_view_release(&counts);
    tensor_view_release(&sums);
    tensor_view_release(&moments);
    self->busy = 0;
    return result;
}

PyDoc_STRVAR(merge_doc,
"merge($self, other, /)\n--\n\n"
"Add the counts, sums and moments of `other` (a PairMoments of the same shape).");

static PyObject *PairMoments_merge(PyObject *op, PyObject *other_obj)
{
    PairMoments *self = (PairMoments *)op;
    if (!Py_IS_TYPE(other_obj, Py_TYPE(self))) {
        PyErr_Format(PyExc_TypeError, "other must be a PairMoments, not %.200s",
                     Py_TYPE(other_obj)->tp_name);
        return NULL;
    }
    PairMoments *other = (PairMoments *)other_obj;
    if (other == self) {
        PyErr_SetString(PyExc_ValueError, "cannot merge a PairMoments into itself");
        return NULL;
    }
    if (other->num_slots != self->num_slots || other->hidden != self->hidden) {
        PyErr_Format(PyExc_ValueError,
                     "other has %lld slots of hidden %lld, expected %lld slots of hidden %lld",
                     (long long)other->num_slots, (long long)other->hidden,
                     (long long)self->num_slots, (long long)self->hidden);
        return NULL;
    }
    if (other->busy) {
        PyErr_SetString(PyExc_RuntimeError, "other PairMoments is in use by another thread");
        return NULL;
    }
    if (enter(self) < 0)
        return NULL;
    for (int64_t s = 0; s < self->num_slots; s++)
        self->counts[s] += other->counts[s];
    for (int64_t i = 0; i < self->num_slots * self->hidden; i++)
        self->sums[i] += other->sums[i];
    for (int64_t i = 0; i < moment_size(self); i++)
        self->moments[i] += other->moments[i];
    self->busy = 0;
    Py_RETURN_NONE;
}

static PyObject *PairMoments_reset(PyObject *op, PyObject *Py_UNUSED(ignored))
{
    PairMoments *self = (PairMoments *)op;
    if (enter(self) < 0)
        return NULL;
    memset(self->counts, 0, (size_t)self->num_slots * sizeof(int64_t));
    memset(self->sums, 0, (size_t)(self->num_slots * self->hidden) * sizeof(double));
    memset(self->moments, 0, (size_t)moment_size(self) * sizeof(double));
    self->busy = 0;
    Py_RETURN_NONE;
}

/* ------------------------------------------------------------------- type */

static PyMemberDef PairMoments_members[] = {
    {"num_slots", Py_T_PYSSIZET, offsetof(PairMoments, num_slots), Py_READONLY,
     "Number of slots (hooked layers)."},
    {"hidden", Py_T_PYSSIZET, offsetof(PairMoments, hidden), Py_READONLY, "Width of each row."},
    {NULL},
};

/* add takes keywords: PyCFunctionWithKeywords goes through the documented
 * (PyCFunction)(void (*)(void)) cast, and CPython calls it back with its real type. */
static PyMethodDef PairMoments_methods[] = {
    {"add", (PyCFunction)(void (*)(void))PairMoments_add, METH_VARARGS | METH_KEYWORDS, add_doc},
    {"state", PairMoments_state, METH_NOARGS, state_doc},
    {"load_state", PairMoments_load_state, METH_VARARGS, load_state_doc},
    {"merge", PairMoments_merge, METH_O, merge_doc},
    {"reset", PairMoments_reset, METH_NOARGS,
     "reset($self, /)\n--\n\nSet every count, sum and moment to zero."},
    {NULL},
};

PyDoc_STRVAR(PairMoments_doc,
"PairMoments(num_slots, hidden)\n--\n\n"
"Float64 count, sum and second moment (sum of outer products) of paired differences\n"
"d = positive row - negative row, per slot.");

static PyType_Slot PairMoments_slots[] = {
    {Py_tp_new, PairMoments_new},
    {Py_tp_dealloc, PairMoments_dealloc},
    {Py_tp_methods, PairMoments_methods},
    {Py_tp_members, PairMoments_members},
    {Py_tp_doc, (void *)PairMoments_doc},
    {0, NULL},
};

static PyType_Spec pair_moments_spec = {
    .name = "rotalabs_steer._core.PairMoments",
    .basicsize = sizeof(PairMoments),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_IMMUTABLETYPE,
    .slots = PairMoments_slots,
};

int pair_moments_add_type(PyObject *module)
{
    /* Each translation unit has its own copy of NumPy's API table. */
    if (_import_array() < 0)
        return -1;
    PyObject *type = PyType_FromModuleAndSpec(module, &pair_moments_spec, NULL);
    if (type == NULL)
        return -1;
    int status = PyModule_AddType(module, (PyTypeObject *)type);
    Py_DECREF(type);
    return status;
}
