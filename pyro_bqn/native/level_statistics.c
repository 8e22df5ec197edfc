/* Fused statistics of independent categoricals over K levels, one per weight.
 *
 * theta is stored levels first: theta[k * stride + i] is the logit of level k of weight i
 * (i < n; stride >= n lets a caller hand disjoint ranges of weights to several threads).
 * Forward, for q = softmax_k(theta[., i]):
 *   mean = sum_k q_k v_k, second = sum_k q_k v_k^2, var = max(second - mean^2, 0),
 *   negent = sum_k q_k log q_k.
 * Backward, with a = dL/dmean - 2 mean dL/dvar, b = dL/dsecond + dL/dvar, h = dL/dnegent:
 *   g_k = a v_k + b v_k^2 + h log q_k,  dL/dtheta_k = q_k (g_k - sum_j q_j g_j),
 *   dL/dv_k = sum_i q_ik (a_i + 2 v_k b_i).
 * q is recomputed in the backward pass rather than stored: exp is cheaper than the
 * memory traffic of saving K x n probabilities.
 *
 * Weights are processed in blocks so every inner loop runs over contiguous memory and
 * vectorises (with -ffast-math, exp and log use glibc's vector math library). Each
 * function returns the number of non-finite logits; the caller then discards the result
 * and uses the exact torch path, because -ffast-math assumes finite values.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#define BLOCK 256
#define MAX_LEVELS 16

static inline int64_t not_finite_f(float x) {
  uint32_t bits;
  memcpy(&bits, &x, sizeof bits);
  return (bits & 0x7f800000u) == 0x7f800000u;
}

static inline int64_t not_finite_d(double x) {
  uint64_t bits;
  memcpy(&bits, &x, sizeof bits);
  return (bits & 0x7ff0000000000000ull) == 0x7ff0000000000000ull;
}

/* Block maximum over levels, the exponentials e[k][i] = exp(theta - max) and their sum. */
#define DEFINE_SOFTMAX_BLOCK(T, SUFFIX, EXP)                                                \
  static int64_t softmax_block_##SUFFIX(const T *theta, int64_t num_levels, int64_t stride, \
                                        int64_t start, int64_t len, T *m, T *z,             \
                                        T e[][BLOCK]) {                                     \
    int64_t bad = 0;                                                                        \
    memcpy(m, theta + start, len * sizeof(T));                                              \
    for (int64_t k = 0; k < num_levels; ++k) {                                              \
      const T *row = theta + k * stride + start;                                            \
      _Pragma("omp simd reduction(+ : bad)") for (int64_t i = 0; i < len; ++i) {            \
        bad += not_finite_##SUFFIX(row[i]);                                                 \
        m[i] = row[i] > m[i] ? row[i] : m[i];                                               \
      }                                                                                     \
    }                                                                                       \
    memset(z, 0, len * sizeof(T));                                                          \
    for (int64_t k = 0; k < num_levels; ++k) {                                              \
      const T *row = theta + k * stride + start;                                            \
      _Pragma("omp simd") for (int64_t i = 0; i < len; ++i) {                               \
        e[k][i] = EXP(row[i] - m[i]);                                                       \
        z[i] += e[k][i];                                                                    \
      }                                                                                     \
    }                                                                                       \
    return bad;                                                                             \
  }

#define DEFINE_FORWARD(T, SUFFIX, LOG)                                                      \
  int64_t level_statistics_forward_##SUFFIX(const T *theta, int64_t num_levels, int64_t n,  \
                                            int64_t stride, const T *v, T *mean, T *var, T *second, \
                                            T *negent) {                                    \
    if (num_levels < 1 || num_levels > MAX_LEVELS) return -1;                               \
    int64_t bad = 0;                                                                        \
    T m[BLOCK], z[BLOCK], s1[BLOCK], s2[BLOCK], sl[BLOCK], e[MAX_LEVELS][BLOCK];            \
    for (int64_t start = 0; start < n; start += BLOCK) {                                    \
      int64_t len = n - start < BLOCK ? n - start : BLOCK;                                  \
      bad += softmax_block_##SUFFIX(theta, num_levels, stride, start, len, m, z, e);        \
      memset(s1, 0, len * sizeof(T));                                                       \
      memset(s2, 0, len * sizeof(T));                                                       \
      memset(sl, 0, len * sizeof(T));                                                       \
      for (int64_t k = 0; k < num_levels; ++k) {                                            \
        const T *row = theta + k * stride + start;                                          \
        const T vk = v[k], vk2 = v[k] * v[k];                                               \
        _Pragma("omp simd") for (int64_t i = 0; i < len; ++i) {                             \
          s1[i] += e[k][i] * vk;                                                            \
          s2[i] += e[k][i] * vk2;                                                           \
          sl[i] += e[k][i] * (row[i] - m[i]);                                               \
        }                                                                                   \
      }                                                                                     \
      _Pragma("omp simd") for (int64_t i = 0; i < len; ++i) {                               \
        const T inv = (T)1 / z[i];                                                          \
        const T mu = s1[i] * inv, sec = s2[i] * inv, d = sec - mu * mu;                     \
        mean[start + i] = mu;                                                               \
        second[start + i] = sec;                                                            \
        var[start + i] = d > 0 ? d : 0;                                                     \
        negent[start + i] = sl[i] * inv - LOG(z[i]);                                        \
      }                                                                                     \
    }                                                                                       \
    return bad;                                                                             \
  }

/* Gradients may be NULL (an output the loss does not use). g_levels, when not NULL,
 * receives sum_i q_ik (a_i + 2 v_k b_i) for each level k, accumulated in double. */
#define DEFINE_BACKWARD(T, SUFFIX, LOG)                                                     \
  int64_t level_statistics_backward_##SUFFIX(                                               \
      const T *theta, int64_t num_levels, int64_t n, int64_t stride, const T *v, const T *mean, \
      const T *g_mean, const T *g_var, const T *g_second, const T *g_negent, T *g_theta,    \
      double *g_levels) {                                                                   \
    if (num_levels < 1 || num_levels > MAX_LEVELS) return -1;                               \
    int64_t bad = 0;                                                                        \
    T m[BLOCK], z[BLOCK], a[BLOCK], b[BLOCK], h[BLOCK], lz[BLOCK], c[BLOCK];                \
    T e[MAX_LEVELS][BLOCK];                                                                 \
    for (int64_t start = 0; start < n; start += BLOCK) {                                    \
      int64_t len = n - start < BLOCK ? n - start : BLOCK;                                  \
      bad += softmax_block_##SUFFIX(theta, num_levels, stride, start, len, m, z, e);        \
      _Pragma("omp simd") for (int64_t i = 0; i < len; ++i) {                               \
        const int64_t j = start + i;                                                        \
        const T gv = g_var ? g_var[j] : 0;                                                  \
        a[i] = (g_mean ? g_mean[j] : 0) - 2 * mean[j] * gv;                                 \
        b[i] = (g_second ? g_second[j] : 0) + gv;                                           \
        h[i] = g_negent ? g_negent[j] : 0;                                                  \
        lz[i] = LOG(z[i]);                                                                  \
        z[i] = (T)1 / z[i];                                                                 \
        c[i] = 0;                                                                           \
      }                                                                                     \
      for (int64_t k = 0; k < num_levels; ++k) {                                            \
        const T *row = theta + k * stride + start;                                          \
        const T vk = v[k], vk2 = v[k] * v[k];                                               \
        _Pragma("omp simd") for (int64_t i = 0; i < len; ++i) {                             \
          e[k][i] *= z[i];                                                                  \
          c[i] += e[k][i] * (a[i] * vk + b[i] * vk2 + h[i] * (row[i] - m[i] - lz[i]));      \
        }                                                                                   \
      }                                                                                     \
      for (int64_t k = 0; k < num_levels; ++k) {                                            \
        const T *row = theta + k * stride + start;                                          \
        T *out = g_theta + k * stride + start;                                              \
        const T vk = v[k], vk2 = v[k] * v[k];                                               \
        double level_sum = 0;                                                               \
        _Pragma("omp simd reduction(+ : level_sum)") for (int64_t i = 0; i < len; ++i) {    \
          const T g = a[i] * vk + b[i] * vk2 + h[i] * (row[i] - m[i] - lz[i]);              \
          out[i] = e[k][i] * (g - c[i]);                                                    \
          level_sum += e[k][i] * (a[i] + 2 * vk * b[i]);                                    \
        }                                                                                   \
        if (g_levels) g_levels[k] += level_sum;                                             \
      }                                                                                     \
    }                                                                                       \
    return bad;                                                                             \
  }

DEFINE_SOFTMAX_BLOCK(float, f, expf)
DEFINE_SOFTMAX_BLOCK(double, d, exp)
DEFINE_FORWARD(float, f, logf)
DEFINE_FORWARD(double, d, log)
DEFINE_BACKWARD(float, f, logf)
DEFINE_BACKWARD(double, d, log)
