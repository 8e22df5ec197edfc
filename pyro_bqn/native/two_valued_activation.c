/* Moments of a two-valued step activation (Sign and its kin) for Gaussian inputs, forward
 * and backward, one pass over the entries each.
 *
 * Input entry i is h ~ N(mu_i, s2_i); the activation is a0 below the threshold t and a1 from
 * it on (a0 < a1, d = a1 - a0). With the same guards as pyro_bqn.nn.gaussian:
 *   c = max(s2, floor),  sigma = sqrt(c),  u = (t - mu) / sigma,  z = clip(u, -40, 40),
 *   above = Phi(-z),  below = Phi(z),
 *   out_mean = a0 + d above,  out_var = max(d^2 above below, 0).
 * The smaller of above and below is the normal tail 0.5 erfc(|z| / sqrt 2) (relative
 * precision far out), the larger is 1 minus it, so each entry needs one erfc.
 *
 * Backward, for dL/dout_mean = gm and dL/dout_var = gv (what autograd of the torch code
 * gives, including the guards' zero gradients): with phi = exp(-z^2/2) / sqrt(2 pi),
 *   dL/dz  = phi (d^2 (above - below) gv - d gm)   (dabove/dz = -phi, dbelow/dz = phi)
 *   dL/du  = dL/dz where -40 <= u <= 40, else 0     (the clip)
 *   dL/dmu = -dL/du / sigma
 *   dL/ds2 = -dL/du u / (2 c) where s2 >= floor, else 0  (the floor; d sigma/dc = 1/(2 sigma))
 * (the clamp of the variance at 0 passes the gradient: its argument is never negative).
 * Where the gradient is not cut, u = z, so the code multiplies by z: u may be huge.
 * Gradients of a0, a1 and t (learnable levels) are sums over all entries and are left to the
 * caller; note dL/dt = -sum_i dL/dmu_i.
 *
 * The forward pass returns 1 if any input (mu, s2, a0, a1 or t) is not finite, else 0: the
 * library is built with -ffast-math, which assumes finite values, so the caller then
 * discards the result and uses the exact torch code. The backward pass runs only after a
 * finite forward pass. Per-entry work is written inline (macros, not helper functions that
 * write through pointers) so that gcc vectorises the loops, with erfc and exp from glibc's
 * vector math library.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "finite.h"

#define Z_MAX 40
#define SQRT_HALF 0.70710678118654752440
#define INV_SQRT_2PI 0.39894228040143267794
#define ZERO_BLOCK 1024


/* glibc's vector erfc and exp hand every lane whose result underflows to the scalar
 * function, which made a pass 10 to 30 times slower when some units are confident (|z| above
 * about 13 in float32, 37 in float64). So their arguments are cut where the result is still a
 * normal number and the result (the tail probability, or the gradient through phi) set to 0
 * beyond. What is dropped is a probability or density below 1e-37 (float32) or 1e-295
 * (float64), so a gradient term below that over sigma (sigma >= 3e-10 and 1e-77 with the
 * variance floor): far under the precision of any sum it enters. */
#define ERFC_ARG_MAX_f 9.1f /* 0.5 erfc(9.1) = 3.3e-38 > FLT_MIN; erfcf underflows past 10.05 */
#define ERFC_ARG_MAX_d 26.0 /* 0.5 erfc(26) = 2.8e-296 > DBL_MIN; erfc underflows past 27.2 */
#define EXP_ARG_MIN_f -87.0f /* expf(-87) = 1.6e-38 > FLT_MIN */
#define EXP_ARG_MIN_d -708.0 /* exp(-708) = 3.3e-308 > DBL_MIN */

/* Declares c, sigma, u, z, above and below for entry i (a statement list, see above). */
#define STANDARDIZE(T, SUFFIX, SQRT, ERFC)                                                  \
  const T s2 = var[i], c = s2 > floor_ ? s2 : floor_, sigma = SQRT(c);                     \
  const T u = (t - mean[i]) / sigma;                                                       \
  const T z = u < -(T)Z_MAX ? -(T)Z_MAX : (u > (T)Z_MAX ? (T)Z_MAX : u);                   \
  const T x = (z < 0 ? -z : z) * (T)SQRT_HALF;                                             \
  const T erfc_x = ERFC(x < ERFC_ARG_MAX_##SUFFIX ? x : ERFC_ARG_MAX_##SUFFIX);            \
  const T tail = x <= ERFC_ARG_MAX_##SUFFIX ? (T)0.5 * erfc_x : 0;                         \
  const T above = z >= 0 ? tail : (T)1 - tail, below = z >= 0 ? (T)1 - tail : tail;

#define DEFINE_ENTRY_POINTS(T, SUFFIX, SQRT, ERFC, EXP)                                     \
  int64_t two_valued_forward_##SUFFIX(const T *mean, const T *var, int64_t n,             \
                                      const T *values, const T *thresholds,               \
                                      double variance_floor, T *out_mean, T *out_var) {   \
    const T a0 = values[0], d = values[1] - values[0], d2 = d * d, t = thresholds[0];     \
    const T floor_ = (T)variance_floor;                                                    \
    int32_t bad = not_finite_##SUFFIX(values[0]) | not_finite_##SUFFIX(values[1]) |        \
                  not_finite_##SUFFIX(t);                                                  \
    _Pragma("omp simd reduction(| : bad)") for (int64_t i = 0; i < n; ++i) {               \
      bad |= not_finite_##SUFFIX(mean[i]) | not_finite_##SUFFIX(var[i]);                   \
      STANDARDIZE(T, SUFFIX, SQRT, ERFC)                                                   \
      const T spread = d2 * above * below;                                                 \
      out_mean[i] = a0 + d * above;                                                        \
      out_var[i] = spread > 0 ? spread : 0;                                                \
    }                                                                                      \
    return bad;                                                                            \
  }                                                                                        \
  /* A missing output gradient (NULL: the loss does not use that output) reads from a     \
   * block of zeros, so the vectorised loop needs no per-entry test. */                    \
  static const T zeros_##SUFFIX[ZERO_BLOCK];                                               \
  int64_t two_valued_backward_##SUFFIX(const T *mean, const T *var, int64_t n,            \
                                       const T *values, const T *thresholds,              \
                                       double variance_floor, const T *g_out_mean,        \
                                       const T *g_out_var, T *g_mean, T *g_var) {         \
    const T d = values[1] - values[0], d2 = d * d, t = thresholds[0];                      \
    const T floor_ = (T)variance_floor;                                                    \
    for (int64_t start = 0; start < n; start += ZERO_BLOCK) {                              \
      const int64_t len = n - start < ZERO_BLOCK ? n - start : ZERO_BLOCK;                 \
      const T *gm = g_out_mean ? g_out_mean + start : zeros_##SUFFIX;                      \
      const T *gv = g_out_var ? g_out_var + start : zeros_##SUFFIX;                        \
      _Pragma("omp simd") for (int64_t j = 0; j < len; ++j) {                              \
        const int64_t i = start + j;                                                       \
        STANDARDIZE(T, SUFFIX, SQRT, ERFC)                                                 \
        const T e = (T)-0.5 * z * z;                                                       \
        const T exp_e = EXP(e > EXP_ARG_MIN_##SUFFIX ? e : EXP_ARG_MIN_##SUFFIX);          \
        const T phi = exp_e * (T)INV_SQRT_2PI;                                             \
        const T g_z = phi * (d2 * (above - below) * gv[j] - d * gm[j]);                    \
        /* Zero outside the clip, and where phi is below the exp cut (a zero there selected \
         * on phi itself made gcc move exp into a branch and give up vectorising). */       \
        const int in_range =                                                               \
            u >= -(T)Z_MAX && u <= (T)Z_MAX && e >= EXP_ARG_MIN_##SUFFIX;                  \
        const T g_u = in_range ? g_z : 0;                                                  \
        g_mean[i] = -g_u / sigma;                                                          \
        g_var[i] = s2 >= floor_ ? (T)-0.5 * g_u * z / c : 0;                               \
      }                                                                                    \
    }                                                                                      \
    return 0;                                                                              \
  }

DEFINE_ENTRY_POINTS(float, f, sqrtf, erfcf, expf)
DEFINE_ENTRY_POINTS(double, d, sqrt, erfc, exp)
