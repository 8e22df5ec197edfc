/* Fused statistics of independent categoricals over K levels, one per weight.
 *
 * theta is stored levels first: theta[k * stride + i] is the logit of level k of weight i
 * (i < n; stride >= n lets a caller hand disjoint ranges of weights to several threads).
 * Forward, for q = softmax_k(theta[., i]):
 *   mean = sum_k q_k v_k, second = sum_k q_k v_k^2, var = max(second - mean^2, 0),
 *   negent = sum_k q_k log q_k,
 * and the log-normaliser lse = log sum_k exp(theta_k), which the backward pass reads.
 * Backward, with a = dL/dmean - 2 mean dL/dvar, b = dL/dsecond + dL/dvar, h = dL/dnegent:
 *   g_k = a v_k + b v_k^2 + h log q_k,  dL/dtheta_k = q_k (g_k - sum_j q_j g_j).
 * q = exp(theta - lse) is recomputed in the backward pass rather than stored: exp is
 * cheaper than the memory traffic of saving K x n probabilities.
 *
 * Each function is instantiated for every K from 2 to 16, so the loop over levels is
 * unrolled and a weight's K logits stay in registers; the loop over weights vectorises
 * (with -ffast-math, exp and log use glibc's vector math library). The forward pass
 * returns 1 if any logit is not finite, or if a weight's logits lie more than half the
 * type's range apart (else 0), and the caller then discards its result and uses the exact
 * torch path: -ffast-math assumes finite values, and logits that far apart (e.g. -3e38 and
 * 3e38 in float32) overflow theta_k - max to -inf, whose product with a zero probability is
 * NaN. Within that bound theta_k - lse stays finite; where q_k underflows to 0 its log_q
 * term is dropped from g_k (as torch drops 0 log 0), since h log q_k could still overflow.
 * The backward pass runs only after a successful forward pass. Both return -1 for an
 * unsupported K.
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "finite.h"

#define MAX_LEVELS 16
/* How far below a weight's largest logit another may lie before the forward pass refuses. */
#define MAX_SPREAD_f (FLT_MAX / 2)
#define MAX_SPREAD_d (DBL_MAX / 2)


/* Loads weight i's K logits into t[k] and their maximum into m, and records in bad
 * whether any is not finite (a statement, not a function: gcc does not vectorise the
 * weight loop around a helper that writes through pointers). */
#define LOAD_LOGITS(T, SUFFIX)                                                              \
  T t[MAX_LEVELS], m = theta[i];                                                           \
  for (int k = 0; k < K; ++k) {                                                            \
    t[k] = theta[k * stride + i];                                                          \
    bad |= not_finite_##SUFFIX(t[k]);                                                      \
    m = t[k] > m ? t[k] : m;                                                               \
  }

#define DEFINE_FORWARD(T, SUFFIX, EXP, LOG)                                                \
  static inline __attribute__((always_inline)) int64_t forward_##SUFFIX(                   \
      const T *theta, const int K, int64_t n, int64_t stride, const T *v, T *mean, T *var, \
      T *second, T *negent, T *lse) {                                                      \
    T v1[MAX_LEVELS], v2[MAX_LEVELS];                                                      \
    for (int k = 0; k < K; ++k) {                                                          \
      v1[k] = v[k];                                                                        \
      v2[k] = v[k] * v[k];                                                                 \
    }                                                                                      \
    int32_t bad = 0;                                                                       \
    _Pragma("omp simd reduction(| : bad)") for (int64_t i = 0; i < n; ++i) {               \
      LOAD_LOGITS(T, SUFFIX)                                                                \
      T z = 0, s1 = 0, s2 = 0, sl = 0;                                                     \
      for (int k = 0; k < K; ++k) {                                                        \
        const T d = t[k] - m, e = EXP(d);                                                  \
        bad |= d < -MAX_SPREAD_##SUFFIX;                                                   \
        z += e;                                                                            \
        s1 += e * v1[k];                                                                   \
        s2 += e * v2[k];                                                                   \
        sl += e * d;                                                                       \
      }                                                                                    \
      const T inv = (T)1 / z, mu = s1 * inv, sec = s2 * inv, spread = sec - mu * mu;       \
      const T log_z = LOG(z);                                                              \
      mean[i] = mu;                                                                        \
      second[i] = sec;                                                                     \
      var[i] = spread > 0 ? spread : 0;                                                    \
      negent[i] = sl * inv - log_z;                                                        \
      lse[i] = m + log_z;                                                                  \
    }                                                                                      \
    return bad;                                                                            \
  }

/* Gradients may be NULL (an output the loss does not use: zero) or, when bit j of
 * broadcast is set (j = 0..3 for g_mean, g_var, g_second, g_negent), hold one value for
 * every weight (the gradient of a sum). Both read from a block filled once, so the
 * vectorised loop needs no per-weight test. lse is the forward pass's log-normaliser, so
 * log q_k = theta_k - lse needs neither a maximum nor a log. */
#define BLOCK 1024
#define GRADIENT_SOURCE(T, NAME, BIT)                                                      \
  T NAME##_block[BLOCK];                                                                   \
  const int NAME##_fixed = NAME == NULL || ((broadcast >> (BIT)) & 1);                     \
  if (NAME##_fixed) {                                                                      \
    const T value = NAME == NULL ? 0 : NAME[0];                                            \
    for (int64_t i = 0; i < BLOCK; ++i) NAME##_block[i] = value;                           \
  }
#define GRADIENT_AT(NAME, START) (NAME##_fixed ? NAME##_block : NAME + (START))
#define DEFINE_BACKWARD(T, SUFFIX, EXP)                                                    \
  static inline __attribute__((always_inline)) int64_t backward_##SUFFIX(                  \
      const T *theta, const int K, int64_t n, int64_t stride, const T *v, const T *mean,   \
      const T *lse, const T *g_mean, const T *g_var, const T *g_second, const T *g_negent, \
      T *g_theta, int64_t broadcast) {                                                     \
    T v1[MAX_LEVELS], v2[MAX_LEVELS];                                                      \
    for (int k = 0; k < K; ++k) {                                                          \
      v1[k] = v[k];                                                                        \
      v2[k] = v[k] * v[k];                                                                 \
    }                                                                                      \
    GRADIENT_SOURCE(T, g_mean, 0)                                                          \
    GRADIENT_SOURCE(T, g_var, 1)                                                           \
    GRADIENT_SOURCE(T, g_second, 2)                                                        \
    GRADIENT_SOURCE(T, g_negent, 3)                                                        \
    for (int64_t start = 0; start < n; start += BLOCK) {                                   \
      const int64_t len = n - start < BLOCK ? n - start : BLOCK;                           \
      const T *gm = GRADIENT_AT(g_mean, start), *gv = GRADIENT_AT(g_var, start);           \
      const T *gs = GRADIENT_AT(g_second, start), *gh = GRADIENT_AT(g_negent, start);      \
      _Pragma("omp simd") for (int64_t i = 0; i < len; ++i) {                              \
        const int64_t j = start + i;                                                       \
        const T a = gm[i] - 2 * mean[j] * gv[i], b = gs[i] + gv[i], h = gh[i];             \
        T q[MAX_LEVELS], g[MAX_LEVELS], c = 0;                                             \
        for (int k = 0; k < K; ++k) {                                                      \
          const T log_q = theta[k * stride + j] - lse[j];                                  \
          q[k] = EXP(log_q);                                                               \
          g[k] = a * v1[k] + b * v2[k] + h * (q[k] > 0 ? log_q : 0);                       \
          c += q[k] * g[k];                                                                \
        }                                                                                  \
        for (int k = 0; k < K; ++k) g_theta[k * stride + j] = q[k] * (g[k] - c);           \
      }                                                                                    \
    }                                                                                      \
    return 0;                                                                              \
  }

/* One instantiation per K, selected at run time; -1 for an unsupported K. */
#define DISPATCH(CALL)                                                                     \
  switch (num_levels) {                                                                    \
    case 2: return CALL(2);                                                                \
    case 3: return CALL(3);                                                                \
    case 4: return CALL(4);                                                                \
    case 5: return CALL(5);                                                                \
    case 6: return CALL(6);                                                                \
    case 7: return CALL(7);                                                                \
    case 8: return CALL(8);                                                                \
    case 9: return CALL(9);                                                                \
    case 10: return CALL(10);                                                              \
    case 11: return CALL(11);                                                              \
    case 12: return CALL(12);                                                              \
    case 13: return CALL(13);                                                              \
    case 14: return CALL(14);                                                              \
    case 15: return CALL(15);                                                              \
    case 16: return CALL(16);                                                              \
    default: return -1;                                                                    \
  }

#define DEFINE_ENTRY_POINTS(T, SUFFIX, EXP, LOG)                                           \
  DEFINE_FORWARD(T, SUFFIX, EXP, LOG)                                                      \
  DEFINE_BACKWARD(T, SUFFIX, EXP)                                                     \
  int64_t level_statistics_forward_##SUFFIX(const T *theta, int64_t num_levels, int64_t n, \
                                            int64_t stride, const T *v, T *mean, T *var,   \
                                            T *second, T *negent, T *lse) {                \
    DISPATCH(FORWARD_##SUFFIX)                                                             \
  }                                                                                        \
  int64_t level_statistics_backward_##SUFFIX(                                              \
      const T *theta, int64_t num_levels, int64_t n, int64_t stride, const T *v,           \
      const T *mean, const T *lse, const T *g_mean, const T *g_var, const T *g_second,     \
      const T *g_negent, T *g_theta, int64_t broadcast) {                                  \
    DISPATCH(BACKWARD_##SUFFIX)                                                            \
  }

#define FORWARD_f(K) forward_f(theta, K, n, stride, v, mean, var, second, negent, lse)
#define FORWARD_d(K) forward_d(theta, K, n, stride, v, mean, var, second, negent, lse)
#define BACKWARD_f(K) \
  backward_f(theta, K, n, stride, v, mean, lse, g_mean, g_var, g_second, g_negent, g_theta, broadcast)
#define BACKWARD_d(K) \
  backward_d(theta, K, n, stride, v, mean, lse, g_mean, g_var, g_second, g_negent, g_theta, broadcast)

DEFINE_ENTRY_POINTS(float, f, expf, logf)
DEFINE_ENTRY_POINTS(double, d, exp, log)
