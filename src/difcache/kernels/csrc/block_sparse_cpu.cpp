// Sparse attention forward on CPU, fp32, reading key/value ranges in place (no gather).
//
// One kernel serves every layout difcache uses: a *range* is a run of consecutive tokens [start, start + len).
// Each (batch, head) has its query ranges and its key ranges; query range i attends to the key ranges listed in
// kv_idx[b, h, i, :kv_cnt[b, h, i]]. Fixed blocks of block_size tokens are ranges with start = j * block_size;
// tile-aligned padded layouts are the same with per-block lengths (padding is never read); Sparse VideoGen 2's
// clusters are ranges of any length over a per-head permutation.
//
// Work is split into tasks of at most `row_tile` query rows of one query range (at::parallel_for), a range cut
// into equal tiles. Per task the
// listed key ranges are walked in list order; consecutive entries that are adjacent in memory (start of the next
// == end of the previous) are merged into one run, and every run is processed in column chunks of at most
// `col_tile` keys with the FlashAttention update (online softmax; Dao et al., arXiv:2205.14135):
// S = scale * Q K^T and acc += P V through BLAS sgemm (the one libtorch_cpu exports), the softmax in fp32 in
// between. Merging adjacent ranges matters for small clusters and for neighbouring blocks: a 128 x 256 GEMM runs
// closer to the big-GEMM rate than two 128 x 128 ones.
//
// Output is normalised at the end; lse = m + log(l). Rows covered by no query range, or whose range lists no key,
// are not written: the Python caller allocates out = 0 and lse = -inf. No infinity is ever formed in this file: it
// is built with -ffast-math (finite math only), which is what lets the compiler vectorise the row max and the
// exponentials (~10x faster than without it).
//
// Layout (checked by the Python caller): q [B, H, Nq, D], k, v [B, H, Nk, D] contiguous fp32 (k, v expanded to H
// heads); q_start, q_len [B, H, Mq], k_start, k_len [B, H, Mk], kv_cnt [B, H, Mq], kv_idx [B, H, Mq, K], int64.
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

// One chunk of the online softmax: scores of sq rows against sk keys are in s (overwritten by the
// probabilities); m, l, acc are the running row max, row sum and unnormalised output.
void softmax_update(float* s, float* m, float* l, float* acc, int sq, int sk, int d, bool first) {
  for (int t = 0; t < sq; ++t) {
    float* row = s + static_cast<size_t>(t) * sk;
    float top = row[0];
    for (int c = 1; c < sk; ++c) top = std::max(top, row[c]);
    const float new_m = first ? top : std::max(m[t], top);
    const float shrink = first ? 0.0f : exp_nonpositive(m[t] - new_m);
    float sum = 0.0f;
    for (int c = 0; c < sk; ++c) {
      const float e = exp_nonpositive(row[c] - new_m);
      row[c] = e;
      sum += e;
    }
    l[t] = l[t] * shrink + sum;
    m[t] = new_m;
    if (!first && shrink != 1.0f) {
      float* a = acc + static_cast<size_t>(t) * d;
      for (int e = 0; e < d; ++e) a[e] *= shrink;
    }
  }
}

struct Task {
  int64_t head;  // b * H + h
  int64_t range;  // query range index
  int64_t row0;  // first row of this task inside the range
  int64_t rows;  // rows of this task
};

}  // namespace

std::vector<torch::Tensor> range_sparse_forward(torch::Tensor q, torch::Tensor k, torch::Tensor v,
                                                torch::Tensor q_start, torch::Tensor q_len, torch::Tensor k_start,
                                                torch::Tensor k_len, torch::Tensor kv_idx, torch::Tensor kv_cnt,
                                                double scale, int64_t row_tile, int64_t col_tile,
                                                torch::Tensor out, torch::Tensor lse) {
  const int64_t BH = q.size(0) * q.size(1), Nq = q.size(2), Nk = k.size(2), D = q.size(3);
  const int64_t Mq = q_start.size(2), Mk = k_start.size(2), K = kv_idx.size(3);
  const float* qp = q.data_ptr<float>();
  const float* kp = k.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  const int64_t* qs = q_start.data_ptr<int64_t>();
  const int64_t* ql = q_len.data_ptr<int64_t>();
  const int64_t* ks = k_start.data_ptr<int64_t>();
  const int64_t* kl = k_len.data_ptr<int64_t>();
  const int64_t* idx = kv_idx.data_ptr<int64_t>();
  const int64_t* cnt = kv_cnt.data_ptr<int64_t>();
  float* op = out.data_ptr<float>();
  float* lp = lse.data_ptr<float>();
  const int d = static_cast<int>(D);

  std::vector<Task> tasks;
  for (int64_t head = 0; head < BH; ++head) {
    for (int64_t i = 0; i < Mq; ++i) {
      const int64_t len = ql[head * Mq + i];
      if (cnt[head * Mq + i] == 0 || len == 0) continue;
      // equal tiles of at most row_tile rows: a 300-row cluster is 3 x 100 rows, not 128 + 128 + 44
      const int64_t tiles = (len + row_tile - 1) / row_tile, size = (len + tiles - 1) / tiles;
      for (int64_t r = 0; r < len; r += size) tasks.push_back({head, i, r, std::min(size, len - r)});
    }
  }

  at::parallel_for(0, static_cast<int64_t>(tasks.size()), 1, [&](int64_t begin, int64_t end) {
    std::vector<float> s(static_cast<size_t>(row_tile) * col_tile), acc(static_cast<size_t>(row_tile) * d);
    std::vector<float> m(row_tile), l(row_tile);
    for (int64_t t = begin; t < end; ++t) {
      const Task& task = tasks[t];
      const int64_t list = task.head * Mq + task.range;
      const int64_t row = qs[list] + task.row0;
      const int sq = static_cast<int>(task.rows);
      const float* q_i = qp + (task.head * Nq + row) * D;
      const float* k_h = kp + task.head * Nk * D;
      const float* v_h = vp + task.head * Nk * D;
      std::fill(l.begin(), l.begin() + sq, 0.0f);
      std::fill(acc.begin(), acc.begin() + static_cast<size_t>(sq) * d, 0.0f);
      bool first = true;
      const int64_t listed = cnt[list];
      const int64_t* js = idx + list * K;
      int64_t c = 0;
      while (c < listed) {
        // one run of key ranges that follow each other in memory
        const int64_t j0 = task.head * Mk + js[c];
        const int64_t run_start = ks[j0];
        int64_t run_end = run_start + kl[j0];
        for (++c; c < listed; ++c) {
          const int64_t j = task.head * Mk + js[c];
          if (ks[j] != run_end) break;
          run_end += kl[j];
        }
        for (int64_t c0 = run_start; c0 < run_end; c0 += col_tile) {
          const int sk = static_cast<int>(std::min<int64_t>(col_tile, run_end - c0));
          scores(q_i, k_h + c0 * D, s.data(), sq, sk, d, static_cast<float>(scale));
          softmax_update(s.data(), m.data(), l.data(), acc.data(), sq, sk, d, first);
          accumulate(s.data(), v_h + c0 * D, acc.data(), sq, sk, d);
          first = false;
        }
      }
      if (first) continue;  // every listed range was empty: leave out 0 and lse -inf
      float* o_i = op + (task.head * Nq + row) * D;
      float* lse_i = lp + task.head * Nq + row;
      for (int r = 0; r < sq; ++r) {
        const float inv = 1.0f / l[r];  // l >= 1: the row's largest term is exp(0)
        for (int e = 0; e < d; ++e) o_i[static_cast<size_t>(r) * d + e] = acc[static_cast<size_t>(r) * d + e] * inv;
        lse_i[r] = m[r] + std::log(l[r]);
      }
    }
  });
  return {out, lse};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("range_sparse_forward", &range_sparse_forward,
        "sparse attention forward over query/key ranges, fp32 CPU (writes into out and lse)");
}
