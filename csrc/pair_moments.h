/*
 * PairMoments (pair_moments.c): per-slot float64 count, sum and second moment of paired
 * differences d = pos - neg, the statistics behind the PCA and Fisher extraction methods.
 */
#ifndef ROTALABS_STEER_PAIR_MOMENTS_H
#define ROTALABS_STEER_PAIR_MOMENTS_H

#include "core.h"

/* Creates the PairMoments type and adds it to `module` (module exec). Returns 0 or -1. */
int pair_moments_add_type(PyObject *module);

#endif /* ROTALABS_STEER_PAIR_MOMENTS_H */
