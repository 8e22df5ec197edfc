/* Finiteness tests by bit pattern. The kernels are built with -ffast-math, under which
 * isfinite() may be folded to "true"; testing the exponent bits still works. */
#ifndef PYRO_BQN_FINITE_H
#define PYRO_BQN_FINITE_H

#include <stdint.h>
#include <string.h>

static inline int32_t not_finite_f(float x) {
  uint32_t bits;
  memcpy(&bits, &x, sizeof bits);
  return (bits & 0x7f800000u) == 0x7f800000u;
}

static inline int32_t not_finite_d(double x) {
  uint64_t bits;
  memcpy(&bits, &x, sizeof bits);
  return (bits & 0x7ff0000000000000ull) == 0x7ff0000000000000ull;
}

#endif
