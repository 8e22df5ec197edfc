/* Training-mode batch normalisation of means and variances, per channel.
 *
 * Inputs x (means) and s (variances) are contiguous (N, C, L) arrays: channel c of sample
 * i holds x[(i * C + c) * L + l], l < L (L = 1 for (N, C) input, L = H * W for images).
 * Over the n = N * L values of a channel:
 *   m = mean(x), between = mean((x - m)^2), within = mean(s),
 *   rstd = 1 / sqrt(between + within + eps), scale = gamma * rstd (gamma = 1 if NULL),
 *   y = (x - m) * scale + beta (beta = 0 if NULL), z = s * scale^2.
 * The forward pass writes y, z and the per-channel m, scale and rstd (for the backward
 * pass), and updates running statistics if given (NULL pointers: no update):
 *   running_mean <- (1 - factor) running_mean + factor m,
 *   running_var <- (1 - factor) running_var + factor (within + n / (n - 1) between).
 *
 * Backward, with gy = dL/dy, gz = dL/dz and sums over the channel's n values:
 *   dscale = sum(gy (x - m)) + 2 scale sum(gz s),  dv = -dscale scale rstd^2 / 2,
 *   dL/dx = scale (gy - sum(gy) / n) + 2 dv (x - m) / n,  dL/ds = scale^2 gz + dv / n,
 *   dL/dgamma = dscale rstd,  dL/dbeta = sum(gy).
 * (dL/dx omits a term proportional to sum(x - m), which is zero.)
 *
 * Each direction takes two passes: per-channel sums, then the element-wise outputs. The
 * sums are accumulated in double for either element type. The forward pass sums x - k with
 * k the channel's first value (a shifted one-pass variance, exact enough in double because
 * (m - k)^2 <= n between). Both functions work on the channels [c0, c1) only, so a caller
 * can hand disjoint channel ranges to several threads.
 *
 * Return value: 0 on success; 1 if an input (x, s, gy, gz) or a per-channel statistic is
 * not finite, and then the outputs are garbage and the caller must use its exact torch
 * code (-ffast-math assumes finite values); -1 if memory ran out.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "finite.h"



/* The loops below are written out, not factored into helpers that write through pointers:
 * gcc stops vectorising an omp simd loop around such a call. With L = 1 the channels are
 * the contiguous dimension, so the loops vectorise over channels with per-channel
 * accumulator arrays, taking ROWS rows at a time so that each accumulator is loaded and
 * stored once per ROWS values (a third faster than row by row); with L > 1 they vectorise
 * over l with scalar reductions. */
#define ROWS 4

/* The channels c0..c1 of this call (nc), and its scratch: n_work doubles and n_coef T per
 * channel; returns 0 for no channels and -1 if memory runs out. */
#define SCRATCH(T, n_work, n_coef)                                                         \
  const int64_t nc = c1 - c0;                                                              \
  if (nc <= 0) return 0;                                                                   \
  double *work = malloc((n_work) * nc * sizeof(double));                                   \
  T *coef = malloc((n_coef) * nc * sizeof(T));                                             \
  if (!work || !coef) {                                                                    \
    free(work);                                                                            \
    free(coef);                                                                            \
    return -1;                                                                             \
  }

/* One value's terms of the forward sums (around the shift k) and of the backward sums
 * (at flat index `at`), shared by both layouts. */
#define FORWARD_TERM(T, SUFFIX, x_at, s_at)                                                \
  {                                                                                        \
    const T xv = (x_at), sv = (s_at);                                                      \
    bad |= not_finite_##SUFFIX(xv) | not_finite_##SUFFIX(sv);                              \
    const double d = (double)xv - k;                                                       \
    t1 += d;                                                                               \
    t2 += d * d;                                                                           \
    tw += (double)sv;                                                                      \
  }

#define BACKWARD_TERM(T, SUFFIX, at)                                                       \
  {                                                                                        \
    const T g = gy[at], h = gz[at];                                                        \
    bad |= not_finite_##SUFFIX(g) | not_finite_##SUFFIX(h);                                \
    t1 += (double)g;                                                                       \
    t2 += (double)g * ((double)x[at] - mj);                                                \
    t3 += (double)h * (double)s[at];                                                       \
  }

/* Forward sums over `rows` rows from row i, for L = 1. */
#define FORWARD_ROWS(T, SUFFIX, rows)                                                      \
  {                                                                                        \
    const T *restrict xr = x + i * C + c0, *restrict sr = s + i * C + c0;                  \
    _Pragma("omp simd reduction(| : bad)") for (int64_t j = 0; j < nc; ++j) {              \
      const double k = shift[j];                                                           \
      double t1 = 0, t2 = 0, tw = 0;                                                       \
      for (int r = 0; r < (rows); ++r) {                                                   \
        FORWARD_TERM(T, SUFFIX, xr[r * C + j], sr[r * C + j])                              \
      }                                                                                    \
      a1[j] += t1;                                                                         \
      a2[j] += t2;                                                                         \
      aw[j] += tw;                                                                         \
    }                                                                                      \
  }

/* Backward sums over `rows` rows from row i, for L = 1. */
#define BACKWARD_ROWS(T, SUFFIX, rows)                                                     \
  {                                                                                        \
    const int64_t o = i * C + c0;                                                          \
    _Pragma("omp simd reduction(| : bad)") for (int64_t j = 0; j < nc; ++j) {              \
      const double mj = cm[j];                                                             \
      double t1 = 0, t2 = 0, t3 = 0;                                                       \
      for (int r = 0; r < (rows); ++r) {                                                   \
        BACKWARD_TERM(T, SUFFIX, o + r * C + j)                                            \
      }                                                                                    \
      sy[j] += t1;                                                                         \
      syd[j] += t2;                                                                        \
      szs[j] += t3;                                                                        \
    }                                                                                      \
  }

#define DEFINE_FORWARD(T, SUFFIX)                                                          \
  int64_t batch_norm_moments_forward_##SUFFIX(                                             \
      const T *x, const T *s, const T *gamma, const T *beta, int64_t N, int64_t C,         \
      int64_t L, int64_t c0, int64_t c1, double eps, T *y, T *z, T *mean, T *scale,        \
      T *rstd, T *running_mean, T *running_var, double factor) {                           \
    SCRATCH(T, 4, 4)                                                                       \
    double *restrict shift = work, *restrict a1 = work + nc, *restrict a2 = work + 2 * nc, \
                     *restrict aw = work + 3 * nc;                                         \
    int32_t bad = 0;                                                                       \
    for (int64_t j = 0; j < nc; ++j) {                                                     \
      shift[j] = x[(c0 + j) * L];                                                          \
      a1[j] = a2[j] = aw[j] = 0;                                                           \
    }                                                                                      \
    if (L == 1) {                                                                          \
      int64_t i = 0;                                                                       \
      for (; i + ROWS <= N; i += ROWS) FORWARD_ROWS(T, SUFFIX, ROWS)                       \
      for (; i < N; ++i) FORWARD_ROWS(T, SUFFIX, 1)                                        \
    } else {                                                                               \
      for (int64_t i = 0; i < N; ++i) {                                                    \
        for (int64_t j = 0; j < nc; ++j) {                                                 \
          const T *restrict xr = x + (i * C + c0 + j) * L;                                 \
          const T *restrict sr = s + (i * C + c0 + j) * L;                                 \
          const double k = shift[j];                                                       \
          double t1 = 0, t2 = 0, tw = 0;                                                   \
          _Pragma("omp simd reduction(+ : t1, t2, tw) reduction(| : bad)")                  \
          for (int64_t l = 0; l < L; ++l) {                                                \
            FORWARD_TERM(T, SUFFIX, xr[l], sr[l])                                          \
          }                                                                                \
          a1[j] += t1;                                                                     \
          a2[j] += t2;                                                                     \
          aw[j] += tw;                                                                     \
        }                                                                                  \
      }                                                                                    \
    }                                                                                      \
    /* coef: the per-channel m, scale, scale^2 and beta in T, as the output pass uses; the \
     * sums become m, between and within, in double, for the running statistics. */        \
    T *restrict cm = coef, *restrict cs = coef + nc, *restrict cs2 = coef + 2 * nc,        \
                *restrict cb = coef + 3 * nc;                                              \
    const double inv_n = 1.0 / ((double)N * (double)L);                                    \
    for (int64_t j = 0; j < nc; ++j) {                                                     \
      const int64_t c = c0 + j;                                                            \
      const double m1 = a1[j] * inv_n, spread = a2[j] * inv_n - m1 * m1;                   \
      const double b = spread > 0 ? spread : 0, w = aw[j] * inv_n;                         \
      const double r = 1.0 / sqrt(b + w + eps);                                            \
      const double sc = gamma ? (double)gamma[c] * r : r;                                  \
      bad |= not_finite_d(b) | not_finite_d(w) | not_finite_d(sc) | not_finite_d(r);       \
      mean[c] = cm[j] = (T)(shift[j] + m1);                                                \
      scale[c] = cs[j] = (T)sc;                                                            \
      rstd[c] = (T)r;                                                                      \
      cs2[j] = cs[j] * cs[j];                                                              \
      cb[j] = beta ? beta[c] : (T)0;                                                       \
      a1[j] = shift[j] + m1;                                                               \
      a2[j] = b;                                                                           \
      aw[j] = w;                                                                           \
    }                                                                                      \
    /* The running statistics, as torch's batch norm: Bessel's correction n / (n - 1)     \
     * applies to the spread of the means only (the variances s are exact). Untouched if   \
     * anything is not finite, so that the caller's fallback updates them once. */         \
    if (!bad && running_mean && running_var) {                                             \
      const double n = (double)N * (double)L, correction = n / (n - 1);                    \
      for (int64_t j = 0; j < nc; ++j) {                                                   \
        const int64_t c = c0 + j;                                                          \
        running_mean[c] = (T)((1 - factor) * running_mean[c] + factor * a1[j]);            \
        running_var[c] =                                                                   \
            (T)((1 - factor) * running_var[c] + factor * (aw[j] + correction * a2[j]));    \
      }                                                                                    \
    }                                                                                      \
    free(work);                                                                            \
    if (bad) {                                                                             \
      free(coef);                                                                          \
      return 1;                                                                            \
    }                                                                                      \
    if (L == 1) {                                                                          \
      for (int64_t i = 0; i < N; ++i) {                                                    \
        const int64_t o = i * C + c0;                                                      \
        _Pragma("omp simd") for (int64_t j = 0; j < nc; ++j) y[o + j] =                    \
            (x[o + j] - cm[j]) * cs[j] + cb[j];                                            \
        _Pragma("omp simd") for (int64_t j = 0; j < nc; ++j) z[o + j] = s[o + j] * cs2[j]; \
      }                                                                                    \
    } else {                                                                               \
      for (int64_t i = 0; i < N; ++i) {                                                    \
        for (int64_t j = 0; j < nc; ++j) {                                                 \
          const int64_t o = (i * C + c0 + j) * L;                                          \
          const T mj = cm[j], sj = cs[j], s2j = cs2[j], bj = cb[j];                        \
          _Pragma("omp simd") for (int64_t l = 0; l < L; ++l) y[o + l] =                   \
              (x[o + l] - mj) * sj + bj;                                                   \
          _Pragma("omp simd") for (int64_t l = 0; l < L; ++l) z[o + l] = s[o + l] * s2j;   \
        }                                                                                  \
      }                                                                                    \
    }                                                                                      \
    free(coef);                                                                            \
    return 0;                                                                              \
  }

/* gy and gz must both be given (a caller without one passes zeros). gx, gs, ggamma and
 * gbeta may be NULL: that gradient is not computed. mean, scale and rstd are the forward
 * pass's per-channel values. */
#define DEFINE_BACKWARD(T, SUFFIX)                                                         \
  int64_t batch_norm_moments_backward_##SUFFIX(                                            \
      const T *x, const T *s, const T *gy, const T *gz, int64_t N, int64_t C, int64_t L,   \
      int64_t c0, int64_t c1, const T *mean, const T *scale, const T *rstd, T *gx, T *gs,  \
      T *ggamma, T *gbeta) {                                                               \
    SCRATCH(T, 3, 6)                                                                       \
    double *restrict sy = work, *restrict syd = work + nc, *restrict szs = work + 2 * nc;  \
    T *restrict cm = coef, *restrict cs = coef + nc, *restrict ca = coef + 2 * nc,         \
                *restrict cb = coef + 3 * nc, *restrict cs2 = coef + 4 * nc,               \
                *restrict cv = coef + 5 * nc;                                              \
    for (int64_t j = 0; j < nc; ++j) {                                                     \
      cm[j] = mean[c0 + j];                                                                \
      sy[j] = syd[j] = szs[j] = 0;                                                         \
    }                                                                                      \
    int32_t bad = 0;                                                                       \
    if (L == 1) {                                                                          \
      int64_t i = 0;                                                                       \
      for (; i + ROWS <= N; i += ROWS) BACKWARD_ROWS(T, SUFFIX, ROWS)                      \
      for (; i < N; ++i) BACKWARD_ROWS(T, SUFFIX, 1)                                       \
    } else {                                                                               \
      for (int64_t i = 0; i < N; ++i) {                                                    \
        for (int64_t j = 0; j < nc; ++j) {                                                 \
          const int64_t o = (i * C + c0 + j) * L;                                          \
          const double mj = cm[j];                                                         \
          double t1 = 0, t2 = 0, t3 = 0;                                                   \
          _Pragma("omp simd reduction(+ : t1, t2, t3) reduction(| : bad)")                  \
          for (int64_t l = 0; l < L; ++l) {                                                \
            BACKWARD_TERM(T, SUFFIX, o + l)                                                \
          }                                                                                \
          sy[j] += t1;                                                                     \
          syd[j] += t2;                                                                    \
          szs[j] += t3;                                                                    \
        }                                                                                  \
      }                                                                                    \
    }                                                                                      \
    /* Per channel: dL/dx = scale gy + a (x - m) + b and dL/ds = scale^2 gz + v. */        \
    const double inv_n = 1.0 / ((double)N * (double)L);                                    \
    for (int64_t j = 0; j < nc; ++j) {                                                     \
      const int64_t c = c0 + j;                                                            \
      const double sc = scale[c], r = rstd[c];                                             \
      const double dscale = syd[j] + 2 * sc * szs[j];                                      \
      const double dv = -0.5 * dscale * sc * r * r;                                        \
      bad |= not_finite_d(dscale) | not_finite_d(sy[j]) | not_finite_d(dv);                \
      if (ggamma) ggamma[c] = (T)(dscale * r);                                             \
      if (gbeta) gbeta[c] = (T)sy[j];                                                      \
      cs[j] = (T)sc;                                                                       \
      cs2[j] = (T)(sc * sc);                                                               \
      ca[j] = (T)(2 * dv * inv_n);                                                         \
      cb[j] = (T)(-sc * sy[j] * inv_n);                                                    \
      cv[j] = (T)(dv * inv_n);                                                             \
    }                                                                                      \
    free(work);                                                                            \
    if (bad) {                                                                             \
      free(coef);                                                                          \
      return 1;                                                                            \
    }                                                                                      \
    if (L == 1) {                                                                          \
      for (int64_t i = 0; i < N; ++i) {                                                    \
        const int64_t o = i * C + c0;                                                      \
        if (gx)                                                                            \
          _Pragma("omp simd") for (int64_t j = 0; j < nc; ++j) gx[o + j] =                 \
              cs[j] * gy[o + j] + ca[j] * (x[o + j] - cm[j]) + cb[j];                      \
        if (gs)                                                                            \
          _Pragma("omp simd") for (int64_t j = 0; j < nc; ++j) gs[o + j] =                 \
              cs2[j] * gz[o + j] + cv[j];                                                  \
      }                                                                                    \
    } else {                                                                               \
      for (int64_t i = 0; i < N; ++i) {                                                    \
        for (int64_t j = 0; j < nc; ++j) {                                                 \
          const int64_t o = (i * C + c0 + j) * L;                                          \
          const T mj = cm[j], sj = cs[j], aj = ca[j], bj = cb[j], s2j = cs2[j], vj = cv[j]; \
          if (gx)                                                                          \
            _Pragma("omp simd") for (int64_t l = 0; l < L; ++l) gx[o + l] =                \
                sj * gy[o + l] + aj * (x[o + l] - mj) + bj;                                \
          if (gs)                                                                          \
            _Pragma("omp simd") for (int64_t l = 0; l < L; ++l) gs[o + l] =                \
                s2j * gz[o + l] + vj;                                                      \
        }                                                                                  \
      }                                                                                    \
    }                                                                                      \
    free(coef);                                                                            \
    return 0;                                                                              \
  }

DEFINE_FORWARD(float, f)
DEFINE_FORWARD(double, d)
DEFINE_BACKWARD(float, f)
DEFINE_BACKWARD(double, d)
