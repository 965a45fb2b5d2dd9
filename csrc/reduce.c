/*
 * The hot loop: add selected activation rows into float64 sums. One row adder per
 * dtype, each with a unit-stride path the compiler can vectorise and a general
 * strided path (strides may be zero or negative). Loads go through memcpy so no
 * pointer is ever dereferenced at a type it was not written as.
 */
#include "core.h"

#include <string.h>

static inline double load_f16(const char *p)
{
    uint16_t h;
    memcpy(&h, p, 2);
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exponent = (h >> 10) & 0x1fu;
    uint32_t mantissa = h & 0x3ffu;
    if (exponent == 0) {
        /* zero or subnormal: mantissa * 2^-24, exact in double */
        double magnitude = (double)mantissa * (1.0 / 16777216.0);
        return sign ? -magnitude : magnitude;
    }
    uint32_t bits;
    if (exponent == 31)
        bits = sign | 0x7f800000u | (mantissa << 13); /* inf / nan */
    else
        bits = sign | ((exponent + 112u) << 23) | (mantissa << 13);
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static inline double load_bf16(const char *p)
{
    uint16_t h;
    memcpy(&h, p, 2);
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static inline double load_f32(const char *p)
{
    float f;
    memcpy(&f, p, 4);
    return f;
}

static inline double load_f64(const char *p)
{
    double d;
    memcpy(&d, p, 8);
    return d;
}

typedef void (*add_row_fn)(const char *row, int64_t stride_bytes, int64_t n, double *dst);

#define DEFINE_ADD_ROW(NAME, SIZE, LOAD)                                                    \
    static void add_row_##NAME(const char *row, int64_t stride_bytes, int64_t n,           \
                               double *dst)                                                \
    {                                                                                       \
        if (stride_bytes == SIZE) {                                                         \
            for (int64_t i = 0; i < n; i++)                                                 \
                dst[i] += LOAD(row + i * SIZE);                                             \
        }                                                                                   \
        else {                                                                              \
            for (int64_t i = 0; i < n; i++)                                                 \
                dst[i] += LOAD(row + i * stride_bytes);                                     \
        }                                                                                   \
    }

DEFINE_ADD_ROW(f16, 2, load_f16)
DEFINE_ADD_ROW(bf16, 2, load_bf16)
DEFINE_ADD_ROW(f32, 4, load_f32)
DEFINE_ADD_ROW(f64, 8, load_f64)

static add_row_fn row_adder(RsDtype dtype)
{
    switch (dtype) {
    case RS_F16: return add_row_f16;
    case RS_BF16: return add_row_bf16;
    case RS_F32: return add_row_f32;
    case RS_F64: return add_row_f64;
    default: return NULL; /* excluded by row_plan_check */
    }
}

/* splitmix64: a small, well-mixed generator; seeded, so samples are reproducible. */
static uint64_t next_random(uint64_t *state)
{
    uint64_t z = (*state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

/* Reservoir sampling (Algorithm R): every offered row is kept with equal probability. */
static void offer_row(const RowSample *sample, const double *row, int64_t group, int64_t hidden)
{
    int64_t seen = (*sample->seen)++;
    int64_t slot = seen < sample->capacity
                       ? seen
                       : (int64_t)(next_random(sample->rng) % (uint64_t)(seen + 1));
    if (slot < sample->capacity) {
        memcpy(sample->rows + slot * hidden, row, (size_t)hidden * sizeof(double));
        sample->groups[slot] = group;
    }
}

void reduce_rows(const TensorView *act, const RowPlan *plan, int64_t hidden, double *sums,
                 int64_t *counts, double *scratch, const RowSample *sample)
{
    add_row_fn add_row = row_adder(act->dtype);
    const int64_t item = act->itemsize;
    const int64_t last = act->ndim - 1;
    const int64_t hidden_stride = act->strides[last] * item;
    const int sampling = sample != NULL && sample->capacity > 0;

    for (int64_t b = 0; b < plan->rows; b++) {
        int64_t group = plan->groups[b];
        if (group < 0)
            continue;
        counts[group] += 1;
        if (act->data == NULL)
            continue; /* size-0 tensor: nothing to read */
        const char *row_base = act->data + b * act->strides[0] * item;
        /* The selected row, in float64, into scratch. */
        memset(scratch, 0, (size_t)hidden * sizeof(double));
        switch (plan->select) {
        case RS_ROWS:
            add_row(row_base, hidden_stride, hidden, scratch);
            break;
        case RS_INDEX:
            add_row(row_base + plan->index[b] * act->strides[1] * item, hidden_stride, hidden,
                    scratch);
            break;
        case RS_MASK: {
            const uint8_t *mask = plan->mask + b * plan->seq;
            for (int64_t s = 0; s < plan->seq; s++) {
                if (mask[s])
                    add_row(row_base + s * act->strides[1] * item, hidden_stride, hidden,
                            scratch);
            }
            const double inv = 1.0 / (double)plan->mask_tokens[b];
            for (int64_t h = 0; h < hidden; h++)
                scratch[h] *= inv;
            break;
        }
        }
        double *dst = sums + group * hidden;
        for (int64_t h = 0; h < hidden; h++)
            dst[h] += scratch[h];
        if (sampling)
            offer_row(sample, scratch, group, hidden);
    }
}
