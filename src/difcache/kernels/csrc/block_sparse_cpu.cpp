// Block-sparse attention forward on CPU, fp32, reading key/value blocks in place (no gather).
//
// For every (batch, head, query block) -- one task of at::parallel_for -- walk the listed key blocks and do the
// FlashAttention update (online softmax; Dao et al., arXiv:2205.14135): S = scale * Q_i K_j^T and acc += P V_j
// through BLAS sgemm (the one libtorch_cpu exports), the softmax in between in fp32. Output is normalised at the
// end; lse = m + log(l). A row with no listed block gets output 0 and lse 0 here; the Python caller sets its lse
// to -inf. No infinity is ever formed in this file: it is built with -ffast-math (finite math only), which is
// what lets the compiler vectorise the row max and the exponentials (~10x faster than without it).
//
// Layout (checked by the Python caller): q, k, v [B, H, N, D] contiguous fp32 (k, v already expanded to H
// heads); kv_idx [B, H, M, K] int64, kv_cnt [B, H, M] int64, M = ceil(N / block_size).
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                       const float* beta, float* c, const int* ldc);

namespace {

// exp(x) for x <= 0 in plain float arithmetic that the compiler vectorises (std::exp is a scalar call here):
// Cody-Waite reduction x = n ln2 + r and Cephes' degree-6 polynomial for exp(r), |r| <= ln2 / 2, then 2^n
// through the exponent bits. Relative error ~1e-7. Inputs below -87 are clamped (exp(-87) ~ 1.6e-38, which
// is 0 next to the row's largest term, exp(0) = 1).
inline float exp_nonpositive(float x) {
  x = std::max(x, -87.0f);
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}


// Row-major S[sq x sk] = alpha * Q[sq x d] K[sk x d]^T (column-major view: S^T = K Q^T).
void scores(const float* q, const float* k, float* s, int sq, int sk, int d, float alpha) {
  const float beta = 0.0f;
  sgemm_("T", "N", &sk, &sq, &d, &alpha, k, &d, q, &d, &beta, s, &sk);
}

// Row-major acc[sq x d] += P[sq x sk] V[sk x d] (column-major view: acc^T += V^T P^T).
void accumulate(const float* p, const float* v, float* acc, int sq, int sk, int d) {
  const float one = 1.0f;
  sgemm_("N", "N", &d, &sq, &sk, &one, v, &d, p, &sk, &one, acc, &d);
}

}  // namespace

std::vector<torch::Tensor> block_sparse_forward(torch::Tensor q, torch::Tensor k, torch::Tensor v,
                                                torch::Tensor kv_idx, torch::Tensor kv_cnt, int64_t block_size,
                                                double scale) {
  const int64_t B = q.size(0), H = q.size(1), N = q.size(2), D = q.size(3);
  const int64_t M = kv_idx.size(2), K = kv_idx.size(3);
  auto out = torch::empty_like(q);
  auto lse = torch::empty({B, H, N}, q.options());
  const float* qp = q.data_ptr<float>();
  const float* kp = k.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  const int64_t* idx = kv_idx.data_ptr<int64_t>();
  const int64_t* cnt = kv_cnt.data_ptr<int64_t>();
  float* op = out.data_ptr<float>();
  float* lp = lse.data_ptr<float>();
  const int bs = static_cast<int>(block_size), d = static_cast<int>(D);

  at::parallel_for(0, B * H * M, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> s(static_cast<size_t>(bs) * bs), acc(static_cast<size_t>(bs) * d);
    std::vector<float> m(bs), l(bs);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t head = task / M, i = task % M;
      const int sq = static_cast<int>(std::min<int64_t>(block_size, N - i * block_size));
      const float* q_i = qp + (head * N + i * block_size) * D;
      std::fill(l.begin(), l.begin() + sq, 0.0f);
      std::fill(acc.begin(), acc.begin() + static_cast<size_t>(sq) * d, 0.0f);
      const int64_t listed = cnt[task];
      for (int64_t c = 0; c < listed; ++c) {
        const int64_t j = idx[task * K + c];
        const int sk = static_cast<int>(std::min<int64_t>(block_size, N - j * block_size));
        const float* k_j = kp + (head * N + j * block_size) * D;
        const float* v_j = vp + (head * N + j * block_size) * D;
        scores(q_i, k_j, s.data(), sq, sk, d, static_cast<float>(scale));
        for (int t = 0; t < sq; ++t) {
          float* row = s.data() + static_cast<size_t>(t) * sk;
          float top = row[0];
          for (int c2 = 1; c2 < sk; ++c2) top = std::max(top, row[c2]);
          const float new_m = c == 0 ? top : std::max(m[t], top);
          const float shrink = c == 0 ? 0.0f : exp_nonpositive(m[t] - new_m);
          float sum = 0.0f;
          for (int c2 = 0; c2 < sk; ++c2) {
            const float e = exp_nonpositive(row[c2] - new_m);
            row[c2] = e;
            sum += e;
          }
          l[t] = l[t] * shrink + sum;
          m[t] = new_m;
          if (c > 0 && shrink != 1.0f) {
            float* a = acc.data() + static_cast<size_t>(t) * d;
            for (int e = 0; e < d; ++e) a[e] *= shrink;
          }
        }
        accumulate(s.data(), v_j, acc.data(), sq, sk, d);
      }
      float* o_i = op + (head * N + i * block_size) * D;
      float* lse_i = lp + head * N + i * block_size;
      for (int t = 0; t < sq; ++t) {
        const float inv = l[t] > 0.0f ? 1.0f / l[t] : 0.0f;
        for (int e = 0; e < d; ++e) o_i[static_cast<size_t>(t) * d + e] = acc[static_cast<size_t>(t) * d + e] * inv;
        lse_i[t] = l[t] > 0.0f ? m[t] + std::log(l[t]) : 0.0f;
      }
    }
  });
  return {out, lse};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("block_sparse_forward", &block_sparse_forward, "block-sparse attention forward, fp32 CPU");
}
