/*
 * Accumulator: float64 sums and row counts per (slot, group), where a slot is one
 * hooked layer and a group is positive / negative (or a fold of either). Sums and counts
 * merge by addition, which is what makes batching, distributed all-reduce and resuming
 * exact. A bounded reservoir sample of rows per slot feeds separation metrics; it is
 * local to this accumulator (merge and load_state leave it alone).
 *
 * Thread use: the reduction runs without the GIL. A busy flag, read and written only
 * with the GIL held, refuses a second thread that touches the same accumulator while
 * a reduction is in flight (different accumulators never interfere).
 */
#include "core.h"

#define NPY_NO_DEPRECATED_API NPY_1_7_API_VERSION
#include <numpy/arrayobject.h>

#include <stddef.h>
#include <string.h>

typedef struct {
    PyObject_HEAD
    /* Py_ssize_t (not int64_t) so that PyMemberDef can expose them as Py_T_PYSSIZET. */
    Py_ssize_t num_slots;
    Py_ssize_t num_groups;
    Py_ssize_t hidden;
    double *sums;     /* [num_slots][num_groups][hidden] */
    int64_t *counts;  /* [num_slots][num_groups] */
    double *scratch;  /* [hidden], one selected row */
    RowPlan batch;    /* set by set_batch; batch.groups == NULL when unset */
    int busy;
    /* Reservoir sample of selected rows per slot (sample_rows == 0: none). */
    Py_ssize_t sample_rows;
    double *samples;        /* [num_slots][sample_rows][hidden] */
    int64_t *sample_groups; /* [num_slots][sample_rows] */
    int64_t *sample_seen;   /* [num_slots] */
    uint64_t seed;
    uint64_t rng;
} Accumulator;

int accumulator_numpy_import(void)
{
    return _import_array();
}

int accumulator_check(PyObject *obj, PyTypeObject *type)
{
    return Py_IS_TYPE(obj, type);
}

static int64_t state_size(const Accumulator *self)
{
    return self->num_slots * self->num_groups * self->hidden;
}

static CoreState *get_state(Accumulator *self)
{
    return core_state_from_type(Py_TYPE(self));
}

/* The busy flag: every method that reads or writes the state takes it first and gives
 * it back on its single exit, so a second thread (or a re-entrant callback) is refused
 * instead of racing the reduction that runs without the GIL. GIL held for both. */
static int acquire(Accumulator *self)
{
    if (self->busy) {
        PyErr_SetString(PyExc_RuntimeError,
                        "Accumulator is already in use (by another thread, or re-entrantly from a "
                        "callback); give each thread its own");
        return -1;
    }
    self->busy = 1;
    return 0;
}

static void release(Accumulator *self)
{
    self->busy = 0;
}

/* ------------------------------------------------------------ construction */

static PyObject *Accumulator_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    static char *keywords[] = {"num_slots", "hidden", "num_groups", "sample_rows", "seed", NULL};
    Py_ssize_t num_slots, hidden, num_groups = 2, sample_rows = 0;
    unsigned long long seed = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "nn|n$nK:Accumulator", keywords, &num_slots,
                                     &hidden, &num_groups, &sample_rows, &seed))
        return NULL;
    if (num_slots < 1 || hidden < 1 || num_groups < 1) {
        PyErr_Format(PyExc_ValueError,
                     "num_slots, hidden and num_groups must be >= 1 (got %zd, %zd, %zd)",
                     num_slots, hidden, num_groups);
        return NULL;
    }
    if (sample_rows < 0) {
        PyErr_Format(PyExc_ValueError, "sample_rows must be >= 0, got %zd", sample_rows);
        return NULL;
    }
    if (num_slots > (PY_SSIZE_T_MAX / 16) / num_groups / hidden ||
        (sample_rows > 0 && num_slots > (PY_SSIZE_T_MAX / 16) / sample_rows / hidden)) {
        PyErr_SetString(PyExc_OverflowError, "Accumulator state would be too large");
        return NULL;
    }
    Accumulator *self = (Accumulator *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    self->num_slots = num_slots;
    self->num_groups = num_groups;
    self->hidden = hidden;
    self->sums = PyMem_RawCalloc((size_t)state_size(self), sizeof(double));
    self->counts = PyMem_RawCalloc((size_t)(num_slots * num_groups), sizeof(int64_t));
    self->scratch = PyMem_RawCalloc((size_t)hidden, sizeof(double));
    self->sample_rows = sample_rows;
    self->seed = self->rng = seed;
    self->samples = PyMem_RawCalloc((size_t)(num_slots * sample_rows * hidden) + 1, sizeof(double));
    self->sample_groups = PyMem_RawCalloc((size_t)(num_slots * sample_rows) + 1, sizeof(int64_t));
    self->sample_seen = PyMem_RawCalloc((size_t)num_slots, sizeof(int64_t));
    if (self->sums == NULL || self->counts == NULL || self->scratch == NULL ||
        self->samples == NULL || self->sample_groups == NULL || self->sample_seen == NULL) {
        Py_DECREF(self);
        return PyErr_NoMemory();
    }
    return (PyObject *)self;
}

static void Accumulator_dealloc(PyObject *op)
{
    Accumulator *self = (Accumulator *)op;
    PyTypeObject *type = Py_TYPE(self);
    PyMem_RawFree(self->sums);
    PyMem_RawFree(self->counts);
    PyMem_RawFree(self->scratch);
    PyMem_RawFree(self->samples);
    PyMem_RawFree(self->sample_groups);
    PyMem_RawFree(self->sample_seen);
    row_plan_free(&self->batch);
    type->tp_free(op);
    Py_DECREF(type);
}

/* --------------------------------------------------------------- reduction */

/* Called with the busy flag held. */
static int add_with_plan(CoreState *state, Accumulator *self, Py_ssize_t slot,
                         const RowPlan *plan, PyObject *activations)
{
    if (slot < 0 || slot >= self->num_slots) {
        PyErr_Format(PyExc_IndexError, "slot %zd is out of range for %lld slots", slot,
                     (long long)self->num_slots);
        return -1;
    }
    TensorView act;
    if (tensor_view_acquire(state, activations, "activations", &act) < 0)
        return -1;
    if (row_plan_check(plan, &act, self->hidden) < 0) {
        tensor_view_release(&act);
        return -1;
    }
    double *sums = self->sums + slot * self->num_groups * self->hidden;
    int64_t *counts = self->counts + slot * self->num_groups;
    double *scratch = self->scratch;
    int64_t hidden = self->hidden;
    RowSample sample = {
        .capacity = self->sample_rows,
        .seen = self->sample_seen + slot,
        .rows = self->samples + slot * self->sample_rows * hidden,
        .groups = self->sample_groups + slot * self->sample_rows,
        .rng = &self->rng,
    };
    Py_BEGIN_ALLOW_THREADS
    reduce_rows(&act, plan, hidden, sums, counts, scratch, &sample);
    Py_END_ALLOW_THREADS
    tensor_view_release(&act);
    return 0;
}

int accumulator_add_batch(PyObject *op, Py_ssize_t slot, PyObject *activations)
{
    Accumulator *self = (Accumulator *)op;
    CoreState *state = get_state(self);
    if (state == NULL)
        return -1;
    if (self->batch.groups == NULL) {
        PyErr_SetString(PyExc_RuntimeError,
                        "Accumulator has no batch: call set_batch() before the forward");
        return -1;
    }
    if (acquire(self) < 0)
        return -1;
    int status = add_with_plan(state, self, slot, &self->batch, activations);
    release(self);
    return status;
}

PyDoc_STRVAR(add_doc,
"add($self, /, slot, activations, groups, *, index=None, mask=None)\n--\n\n"
"Add rows of `activations` to slot `slot`.\n\n"
"groups: int [batch], the group of each row (-1 skips it).\n"
"index:  int [batch], the token read from each row of a [batch, seq, hidden] tensor.\n"
"mask:   int/bool [batch, seq], the tokens averaged for each row.\n"
"Without index or mask, activations are [batch, hidden] rows.");

static PyObject *Accumulator_add(PyObject *op, PyObject *args, PyObject *kwargs)
{
    static char *keywords[] = {"slot", "activations", "groups", "index", "mask", NULL};
    Accumulator *self = (Accumulator *)op;
    Py_ssize_t slot;
    PyObject *activations, *groups, *index = Py_None, *mask = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "nOO|$OO:add", keywords, &slot, &activations,
                                     &groups, &index, &mask))
        return NULL;
    CoreState *state = get_state(self);
    if (state == NULL || acquire(self) < 0)
        return NULL;
    PyObject *result = NULL;
    RowPlan plan;
    if (row_plan_build(state, &plan, groups, index, mask, self->num_groups) < 0)
        goto finally;
    if (add_with_plan(state, self, slot, &plan, activations) == 0)
        result = Py_NewRef(Py_None);
    row_plan_free(&plan);
finally:
    release(self);
    return result;
}

PyDoc_STRVAR(set_batch_doc,
"set_batch($self, /, groups, *, index=None, mask=None)\n--\n\n"
"Set the row plan that add_batch() and CaptureHook use for the next forward.");

static PyObject *Accumulator_set_batch(PyObject *op, PyObject *args, PyObject *kwargs)
{
    static char *keywords[] = {"groups", "index", "mask", NULL};
    Accumulator *self = (Accumulator *)op;
    PyObject *groups, *index = Py_None, *mask = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O|$OO:set_batch", keywords, &groups, &index,
                                     &mask))
        return NULL;
    CoreState *state = get_state(self);
    if (state == NULL || acquire(self) < 0)
        return NULL;
    PyObject *result = NULL;
    RowPlan plan;
    if (row_plan_build(state, &plan, groups, index, mask, self->num_groups) < 0)
        goto finally;
    row_plan_free(&self->batch);
    self->batch = plan;
    result = Py_NewRef(Py_None);
finally:
    release(self);
    return result;
}

static PyObject *Accumulator_clear_batch(PyObject *op, PyObject *Py_UNUSED(ignored))
{
    Accumulator *self = (Accumulator *)op;
    if (acquire(self) < 0)
        return NULL;
    row_plan_free(&self->batch);
    release(self);
    Py_RETURN_NONE;
}

PyDoc_STRVAR(add_batch_doc,
"add_batch($self, slot, activations, /)\n--\n\n"
"Add `activations` to slot `slot` with the plan given to set_batch().");

static PyObject *Accumulator_add_batch_method(PyObject *self, PyObject *args)
{
    Py_ssize_t slot;
    PyObject *activations;
    if (!PyArg_ParseTuple(args, "nO:add_batch", &slot, &activations))
        return NULL;
    if (accumulator_add_batch(self, slot, activations) < 0)
        return NULL;
    Py_RETURN_NONE;
}

/* ------------------------------------------------------------------- state */

PyDoc_STRVAR(state_doc,
"state($self, /)\n--\n\n"
"Return (sums, counts) as new NumPy arrays: float64 [slots, groups, hidden] and\n"
"int64 [slots, groups].");

static PyObject *Accumulator_state(PyObject *op, PyObject *Py_UNUSED(ignored))
{
    Accumulator *self = (Accumulator *)op;
    if (acquire(self) < 0)
        return NULL;
    PyObject *result = NULL;
    npy_intp sum_dims[3] = {self->num_slots, self->num_groups, self->hidden};
    npy_intp count_dims[2] = {self->num_slots, self->num_groups};
    PyObject *sums = PyArray_SimpleNew(3, sum_dims, NPY_FLOAT64);
    PyObject *counts = PyArray_SimpleNew(2, count_dims, NPY_INT64);
    if (sums == NULL || counts == NULL)
        goto finally;
    memcpy(PyArray_DATA((PyArrayObject *)sums), self->sums,
           (size_t)state_size(self) * sizeof(double));
    memcpy(PyArray_DATA((PyArrayObject *)counts), self->counts,
           (size_t)(self->num_slots * self->num_groups) * sizeof(int64_t));
    result = PyTuple_Pack(2, sums, counts);
finally:
    Py_XDECREF(sums);
    Py_XDECREF(counts);
    release(self);
    return result;
}

PyDoc_STRVAR(load_state_doc,
"load_state($self, sums, counts, /)\n--\n\n"
"Replace the state with `sums` (float64 [slots, groups, hidden]) and `counts`\n"
"(integer [slots, groups]), e.g. after an all-reduce across processes.");

static PyObject *Accumulator_load_state(PyObject *op, PyObject *args)
{
    Accumulator *self = (Accumulator *)op;
    PyObject *sums_obj, *counts_obj;
    if (!PyArg_ParseTuple(args, "OO:load_state", &sums_obj, &counts_obj))
        return NULL;
    CoreState *state = get_state(self);
    if (state == NULL || acquire(self) < 0)
        return NULL;
    TensorView sums = {0}, counts = {0};
    PyObject *result = NULL;
    int64_t sum_shape[3] = {self->num_slots, self->num_groups, self->hidden};
    int64_t count_shape[2] = {self->num_slots, self->num_groups};
    if (tensor_view_acquire(state, sums_obj, "sums", &sums) < 0)
        goto finally;
    if (tensor_view_acquire(state, counts_obj, "counts", &counts) < 0)
        goto finally;
    if (sums.dtype != RS_F64) {
        PyErr_Format(PyExc_TypeError, "sums must be float64, not %s", rs_dtype_name(sums.dtype));
        goto finally;
    }
    if (tensor_view_is_float(&counts)) {
        PyErr_Format(PyExc_TypeError, "counts must be integers, not %s",
                     rs_dtype_name(counts.dtype));
        goto finally;
    }
    if (tensor_view_expect_shape(&sums, "sums", 3, sum_shape) < 0 ||
        tensor_view_expect_shape(&counts, "counts", 2, count_shape) < 0)
        goto finally;
    /* Check every count before writing any: an error leaves the state as it was. */
    for (int64_t s = 0; s < self->num_slots; s++) {
        for (int64_t g = 0; g < self->num_groups; g++) {
            int64_t n = tensor_view_int_at(&counts, s * counts.strides[0] + g * counts.strides[1]);
            if (n < 0) {
                PyErr_Format(PyExc_ValueError, "counts[%lld, %lld] is negative", (long long)s,
                             (long long)g);
                goto finally;
            }
        }
    }
    for (int64_t s = 0; s < self->num_slots; s++)
        for (int64_t g = 0; g < self->num_groups; g++)
            self->counts[s * self->num_groups + g] =
                tensor_view_int_at(&counts, s * counts.strides[0] + g * counts.strides[1]);
    for (int64_t s = 0; s < self->num_slots; s++)
        for (int64_t g = 0; g < self->num_groups; g++)
            for (int64_t h = 0; h < self->hidden; h++) {
                int64_t offset = s * sums.strides[0] + g * sums.strides[1] + h * sums.strides[2];
                memcpy(&self->sums[(s * self->num_groups + g) * self->hidden + h],
                       sums.data + offset * 8, 8);
            }
    result = Py_NewRef(Py_None);
finally:
    tensor_view_release(&sums);
    tensor_view_release(&counts);
    release(self);
    return result;
}

PyDoc_STRVAR(merge_doc,
"merge($self, other, /)\n--\n\n"
"Add the sums and counts of `other` (an Accumulator of the same shape) to this one.");

static PyObject *Accumulator_merge(PyObject *op, PyObject *other_obj)
{
    Accumulator *self = (Accumulator *)op;
    if (!Py_IS_TYPE(other_obj, Py_TYPE(self))) {
        PyErr_Format(PyExc_TypeError, "other must be an Accumulator, not %.200s",
                     Py_TYPE(other_obj)->tp_name);
        return NULL;
    }
    Accumulator *other = (Accumulator *)other_obj;
    if (other->num_slots != self->num_slots || other->num_groups != self->num_groups ||
        other->hidden != self->hidden) {
        PyErr_Format(PyExc_ValueError,
                     "other has shape (%lld slots, %lld groups, hidden %lld), expected "
                     "(%lld, %lld, %lld)",
                     (long long)other->num_slots, (long long)other->num_groups,
                     (long long)other->hidden, (long long)self->num_slots,
                     (long long)self->num_groups, (long long)self->hidden);
        return NULL;
    }
    if (other == self) {
        PyErr_SetString(PyExc_ValueError, "cannot merge an Accumulator into itself");
        return NULL;
    }
    /* `other` is only read, with the GIL held: refusing it while busy is enough. */
    if (other->busy) {
        PyErr_SetString(PyExc_RuntimeError, "other Accumulator is in use by another thread");
        return NULL;
    }
    if (acquire(self) < 0)
        return NULL;
    for (int64_t i = 0; i < state_size(self); i++)
        self->sums[i] += other->sums[i];
    for (int64_t i = 0; i < self->num_slots * self->num_groups; i++)
        self->counts[i] += other->counts[i];
    release(self);
    Py_RETURN_NONE;
}

PyDoc_STRVAR(samples_doc,
"samples($self, slot, /)\n--\n\n"
"Return (rows, groups) of the reservoir sample of `slot`: float64 [n, hidden] and\n"
"int64 [n], n = min(rows offered, sample_rows). Every selected row has the same chance\n"
"of being kept; the sample is reproducible for a given seed and row order.");

static PyObject *Accumulator_samples(PyObject *op, PyObject *arg)
{
    Accumulator *self = (Accumulator *)op;
    Py_ssize_t slot = PyLong_AsSsize_t(arg);
    if (slot == -1 && PyErr_Occurred())
        return NULL;
    if (slot < 0 || slot >= self->num_slots) {
        PyErr_Format(PyExc_IndexError, "slot %zd is out of range for %lld slots", slot,
                     (long long)self->num_slots);
        return NULL;
    }
    if (acquire(self) < 0)
        return NULL;
    PyObject *result = NULL;
    int64_t seen = self->sample_seen[slot];
    npy_intp n = seen < self->sample_rows ? seen : self->sample_rows;
    npy_intp row_dims[2] = {n, self->hidden};
    PyObject *rows = PyArray_SimpleNew(2, row_dims, NPY_FLOAT64);
    PyObject *groups = PyArray_SimpleNew(1, &n, NPY_INT64);
    if (rows == NULL || groups == NULL)
        goto finally;
    memcpy(PyArray_DATA((PyArrayObject *)rows),
           self->samples + slot * self->sample_rows * self->hidden,
           (size_t)(n * self->hidden) * sizeof(double));
    memcpy(PyArray_DATA((PyArrayObject *)groups), self->sample_groups + slot * self->sample_rows,
           (size_t)n * sizeof(int64_t));
    result = PyTuple_Pack(2, rows, groups);
finally:
    Py_XDECREF(rows);
    Py_XDECREF(groups);
    release(self);
    return result;
}

static PyObject *Accumulator_reset(PyObject *op, PyObject *Py_UNUSED(ignored))
{
    Accumulator *self = (Accumulator *)op;
    if (acquire(self) < 0)
        return NULL;
    memset(self->sums, 0, (size_t)state_size(self) * sizeof(double));
    memset(self->counts, 0, (size_t)(self->num_slots * self->num_groups) * sizeof(int64_t));
    memset(self->sample_seen, 0, (size_t)self->num_slots * sizeof(int64_t));
    self->rng = self->seed;
    release(self);
    Py_RETURN_NONE;
}

/* ------------------------------------------------------------------- type */

static PyObject *Accumulator_get_batch_rows(PyObject *op, void *Py_UNUSED(closure))
{
    Accumulator *self = (Accumulator *)op;
    if (self->batch.groups == NULL)
        Py_RETURN_NONE;
    return PyLong_FromLongLong(self->batch.rows);
}

static PyMemberDef Accumulator_members[] = {
    {"num_slots", Py_T_PYSSIZET, offsetof(Accumulator, num_slots), Py_READONLY,
     "Number of slots (hooked layers)."},
    {"num_groups", Py_T_PYSSIZET, offsetof(Accumulator, num_groups), Py_READONLY,
     "Number of row groups."},
    {"hidden", Py_T_PYSSIZET, offsetof(Accumulator, hidden), Py_READONLY, "Width of each row."},
    {"sample_rows", Py_T_PYSSIZET, offsetof(Accumulator, sample_rows), Py_READONLY,
     "Capacity of each slot's reservoir sample of rows."},
    {NULL},
};

/* batch_rows is None without a plan, so it stays a getter rather than a member. */
static PyGetSetDef Accumulator_getset[] = {
    {"batch_rows", Accumulator_get_batch_rows, NULL, "Rows in the current batch plan, or None.",
     NULL},
    {NULL},
};

/* add and set_batch take keywords: PyCFunctionWithKeywords goes through the documented
 * (PyCFunction)(void (*)(void)) cast, and CPython calls it back with its real type. */
static PyMethodDef Accumulator_methods[] = {
    {"add", (PyCFunction)(void (*)(void))Accumulator_add, METH_VARARGS | METH_KEYWORDS, add_doc},
    {"set_batch", (PyCFunction)(void (*)(void))Accumulator_set_batch,
     METH_VARARGS | METH_KEYWORDS, set_batch_doc},
    {"clear_batch", Accumulator_clear_batch, METH_NOARGS,
     "clear_batch($self, /)\n--\n\nForget the current batch plan."},
    {"add_batch", Accumulator_add_batch_method, METH_VARARGS, add_batch_doc},
    {"state", Accumulator_state, METH_NOARGS, state_doc},
    {"load_state", Accumulator_load_state, METH_VARARGS, load_state_doc},
    {"merge", Accumulator_merge, METH_O, merge_doc},
    {"samples", Accumulator_samples, METH_O, samples_doc},
    {"reset", Accumulator_reset, METH_NOARGS,
     "reset($self, /)\n--\n\nSet every sum and count to zero and empty the samples."},
    {NULL},
};

PyDoc_STRVAR(Accumulator_doc,
"Accumulator(num_slots, hidden, num_groups=2, *, sample_rows=0, seed=0)\n--\n\n"
"Float64 sums and row counts per (slot, group) for mean-difference vectors, and\n"
"optionally a uniform sample of up to `sample_rows` selected rows per slot.");

static PyType_Slot Accumulator_slots[] = {
    {Py_tp_new, Accumulator_new},
    {Py_tp_dealloc, Accumulator_dealloc},
    {Py_tp_methods, Accumulator_methods},
    {Py_tp_members, Accumulator_members},
    {Py_tp_getset, Accumulator_getset},
    {Py_tp_doc, (void *)Accumulator_doc},
    {0, NULL},
};

PyType_Spec accumulator_spec = {
    .name = "rotalabs_steer._core.Accumulator",
    .basicsize = sizeof(Accumulator),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_IMMUTABLETYPE,
    .slots = Accumulator_slots,
};
