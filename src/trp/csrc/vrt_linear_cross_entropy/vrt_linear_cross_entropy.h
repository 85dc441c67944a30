// Cross-entropy of hidden states against a bound vocabulary (text rows ⊕ the token's own
// sample's patch prototypes), without materialising the [T, V + P] logits.
//
// Token t of sample s = sample_index[t] scores column c < V with h_t · W_c and VRT column V + k
// (k < P_s = proto_offsets[s + 1] − proto_offsets[s]) with h_t · P[proto_offsets[s] + k]; the
// local VRT indices exclude_ids[exclude_offsets[t] : exclude_offsets[t + 1]] leave its softmax
// (PaDT's robust CE). loss_t = lse_t − logit_t[label_t]; tokens labelled ignore_index give 0.
//
// Strategy (both devices): the active tokens are gathered sample-major; a block of tokens times
// a chunk of vocabulary rows is one at::mm into a small buffer, then the per-element math below
// runs over that buffer (an online log-sum-exp in the forward; softmax minus one-hot in the
// backward, whose chunk products accumulate grad_h and write disjoint rows of grad_W / grad_P,
// so no atomics are needed). Only the buffer ever exists, never the full logits.
//
// Precision: the buffer, the log-sum-exp, the label logits, the loss and every gradient
// accumulation are in the accumulation type (float32 for half/bfloat16 inputs). A bfloat16
// buffer rounds each logit by up to 2^-9 of its size, so lse (from rounded logits) and the label
// logit (an exact dot product) disagree and the loss can come out negative; bfloat16 gradient
// sums over token blocks drift the same way. Gradients are cast to the inputs' dtype at the end.
#pragma once

#include <cmath>
#include <vector>

#include <torch/version.h>

#include "common.h"

namespace trp {
namespace vrt_ce {

template <typename T>
C10_HOST_DEVICE inline T exp_(T x) {
#ifdef __CUDA_ARCH__
  return ::exp(x);
#else
  return std::exp(x);
#endif
}

template <typename T>
C10_HOST_DEVICE inline T log_(T x) {
#ifdef __CUDA_ARCH__
  return ::log(x);
#else
  return std::log(x);
#endif
}

template <typename T>
C10_HOST_DEVICE inline T neg_inf() {
  return static_cast<T>(-INFINITY);
}

// Running (max, scaled sum) of a log-sum-exp, mergeable: the CUDA launcher reduces one buffer
// row per block, each thread folding a strided slice, then merges the threads' states.
template <typename acc_t>
struct LseState {
  acc_t m;
  acc_t s;

  C10_HOST_DEVICE static LseState empty() { return {neg_inf<acc_t>(), acc_t(0)}; }

  C10_HOST_DEVICE void add(acc_t x) {
    if (x > m) {
      s = s * exp_(m - x) + acc_t(1);  // exp(-inf) = 0 drops the empty state
      m = x;
    } else if (x != neg_inf<acc_t>()) {  // an excluded (-inf) entry adds 0; skipping it avoids
      s += exp_(x - m);                  // exp(-inf + inf) = NaN while m is still -inf
    }
  }

  C10_HOST_DEVICE void merge(acc_t om, acc_t os) {
    if (os == acc_t(0)) {
      return;
    }
    if (s == acc_t(0)) {
      m = om;
      s = os;
      return;
    }
    const acc_t nm = m > om ? m : om;
    s = s * exp_(m - nm) + os * exp_(om - nm);
    m = nm;
  }
};

// Folds one buffer row of n logits into the running (max m, scaled sum s): after all chunks,
// lse = m + log(s). Excluded entries are −inf and contribute exp(−inf) = 0.
template <typename acc_t, typename scalar_t>
C10_HOST_DEVICE inline void lse_update_row(const scalar_t* row, int64_t n, acc_t* m, acc_t* s) {
  auto state = LseState<acc_t>::empty();
  for (int64_t i = 0; i < n; ++i) {
    state.add(static_cast<acc_t>(row[i]));
  }
  LseState<acc_t> running{*m, *s};
  running.merge(state.m, state.s);
  *m = running.m;
  *s = running.s;
}

template <typename acc_t>
C10_HOST_DEVICE inline acc_t lse_finalize(acc_t m, acc_t s) {
  return m + log_(s);
}

// d loss_t / d logit_tc scaled by the token's incoming gradient g: g · (softmax − one-hot).
template <typename acc_t>
C10_HOST_DEVICE inline acc_t softmax_grad(acc_t logit, acc_t lse, acc_t g, bool is_label) {
  return g * exp_(logit - lse) - (is_label ? g : acc_t(0));
}

template <typename acc_t, typename scalar_t>
C10_HOST_DEVICE inline acc_t dot(const scalar_t* a, const scalar_t* b, int64_t n) {
  acc_t sum = acc_t(0);
  for (int64_t i = 0; i < n; ++i) {
    sum += static_cast<acc_t>(a[i]) * static_cast<acc_t>(b[i]);
  }
  return sum;
}

// Logit of row r's label: text row label, or its sample's prototype row proto_base + label − V.
template <typename acc_t, typename scalar_t>
C10_HOST_DEVICE inline acc_t label_logit(const scalar_t* h_row, const scalar_t* weight,
                                         const scalar_t* protos, int64_t label, int64_t proto_base,
                                         int64_t vocab, int64_t dim) {
  const scalar_t* w = label < vocab ? weight + label * dim : protos + (proto_base + label - vocab) * dim;
  return dot<acc_t>(h_row, w, dim);
}

// Sets the excluded columns of one buffer row (chunk [col_start, col_start + ncols) of the VRT
// part) to −inf.
template <typename scalar_t>
C10_HOST_DEVICE inline void mask_row(scalar_t* row, const int64_t* ex_off, const int64_t* ex_ids,
                                     int64_t token, int64_t col_start, int64_t ncols) {
  for (int64_t e = ex_off[token]; e < ex_off[token + 1]; ++e) {
    const int64_t c = ex_ids[e] - col_start;
    if (c >= 0 && c < ncols) {
      row[c] = static_cast<scalar_t>(-INFINITY);
    }
  }
}

// Host-side precondition checks shared by both launchers and the backward.
inline void check_inputs(const at::Tensor& hidden, const at::Tensor& weight,
                         const at::Tensor& protos, const at::Tensor& sample_index,
                         const at::Tensor& proto_offsets, const at::Tensor& labels,
                         const at::Tensor& ex_off, const at::Tensor& ex_ids, int64_t ignore_index,
                         int64_t chunk_size) {
  check_floating(hidden, "hidden");
  check_dim(hidden, 2, "hidden");
  check_dim(weight, 2, "text_weight");
  check_dim(protos, 2, "prototypes");
  check_same_dtype(hidden, weight, "hidden", "text_weight");
  check_same_dtype(hidden, protos, "hidden", "prototypes");
  const int64_t tokens = hidden.size(0), dim = hidden.size(1), vocab = weight.size(0);
  TORCH_CHECK_VALUE(weight.size(1) == dim, "text_weight must have shape [V, ", dim, "], got ",
                    weight.sizes());
  TORCH_CHECK_VALUE(vocab >= 1, "text_weight must have at least one row");
  TORCH_CHECK_VALUE(protos.size(1) == dim, "prototypes must have shape [P, ", dim, "], got ",
                    protos.sizes());
  TORCH_CHECK_VALUE(chunk_size >= 1, "chunk_size must be >= 1, got ", chunk_size);
  check_dtype(sample_index, at::kLong, "sample_index");
  check_dtype(labels, at::kLong, "labels");
  check_dtype(ex_ids, at::kLong, "exclude_ids");
  TORCH_CHECK_VALUE(sample_index.dim() == 1 && sample_index.size(0) == tokens,
                    "sample_index must have shape [", tokens, "], got ", sample_index.sizes());
  TORCH_CHECK_VALUE(labels.dim() == 1 && labels.size(0) == tokens, "labels must have shape [",
                    tokens, "], got ", labels.sizes());
  check_dim(ex_ids, 1, "exclude_ids");
  TORCH_CHECK_VALUE(proto_offsets.dim() == 1 && proto_offsets.size(0) >= 2,
                    "proto_offsets must have shape [B + 1] with B >= 1, got ",
                    proto_offsets.sizes());
  const int64_t samples = proto_offsets.size(0) - 1;
  for (const at::Tensor* t : {&weight, &protos, &sample_index, &proto_offsets, &labels, &ex_off,
                              &ex_ids}) {
    check_same_device(hidden, *t, "hidden", "every other input");
  }
  check_offsets(proto_offsets, samples, protos.size(0), "proto_offsets");
  check_offsets(ex_off, tokens, ex_ids.size(0), "exclude_offsets");
  if (tokens == 0) {
    return;
  }
  // The value checks are computed on the inputs' device and read back together: one host sync
  // (the offsets above are read on the host anyway). Out-of-range sample indices are clamped for
  // the gather so that reading `own` cannot fault before the check reports them.
  const at::Tensor counts = proto_offsets.slice(0, 1) - proto_offsets.slice(0, 0, samples);
  const at::Tensor bad_sample = ((sample_index < 0) | (sample_index >= samples)).any();
  const at::Tensor own = counts.index_select(0, sample_index.clamp(0, samples - 1));  // T
  const at::Tensor active = labels != ignore_index;
  const at::Tensor bad_label = (active & ((labels < 0) | (labels >= own + vocab))).any();
  std::vector<at::Tensor> flags{bad_sample, bad_label};
  const int64_t num_ex = ex_ids.size(0);
  if (num_ex > 0) {
    const at::Tensor per_token = ex_off.slice(0, 1) - ex_off.slice(0, 0, tokens);
    // output_size: no sync to size the result.
    const at::Tensor token_of = at::repeat_interleave(
        at::arange(tokens, sample_index.options()), per_token, 0, num_ex);  // E: owning token
    flags.push_back(((ex_ids < 0) | (ex_ids >= own.index_select(0, token_of))).any());
    flags.push_back(((ex_ids + vocab) == labels.index_select(0, token_of)).any());
  }
  const at::Tensor host = at::stack(flags).to(at::kCPU);
  const bool* bad = host.const_data_ptr<bool>();
  TORCH_CHECK_VALUE(!bad[0], "sample_index must lie in [0, ", samples, ")");
  TORCH_CHECK_VALUE(!bad[1],
                    "labels must be ignore_index, a text id in [0, V) or a VRT id V + k with k "
                    "below the token's own patch count (V = ",
                    vocab, ")");
  if (num_ex > 0) {
    TORCH_CHECK_VALUE(!bad[2], "exclude_ids must be local VRT indices of the token's own sample");
    TORCH_CHECK_VALUE(!bad[3], "exclude_ids must not contain the token's own label");
  }
}

// The chunked driver, written once with at:: ops; `K` supplies the elementwise kernels of one
// device (lse_update, mask, softmax_grad, label_logits), which call the math above.
struct Plan {
  at::Tensor rows;        // N: original token of each active row, sample-major
  at::Tensor h;           // N x D: hidden states of the active rows
  at::Tensor labels;      // N
  at::Tensor proto_base;  // N: proto_offsets[sample of row]
  std::vector<int64_t> row_off;    // B + 1: rows of sample b
  std::vector<int64_t> proto_off;  // B + 1
  int64_t token_block = 1;
  int64_t vocab_chunk = 1;
};

inline Plan make_plan(const at::Tensor& hidden, const at::Tensor& sample_index,
                      const at::Tensor& proto_offsets, const at::Tensor& labels,
                      int64_t ignore_index, int64_t vocab, int64_t chunk_size) {
  Plan p;
  const at::Tensor active = (labels != ignore_index).nonzero().flatten();
  const at::Tensor order = std::get<1>(
      at::sort(sample_index.index_select(0, active), /*stable=*/true, /*dim=*/0, false));
  p.rows = active.index_select(0, order);
  p.h = hidden.index_select(0, p.rows).contiguous();
  p.labels = labels.index_select(0, p.rows).contiguous();
  const at::Tensor samples = sample_index.index_select(0, p.rows);
  p.proto_base = proto_offsets.index_select(0, samples).contiguous();
  const int64_t num_samples = proto_offsets.size(0) - 1;
  const at::Tensor counts = at::bincount(samples, {}, num_samples).to(at::kCPU);
  const at::Tensor poff = proto_offsets.to(at::kCPU).contiguous();
  p.row_off.assign(num_samples + 1, 0);
  p.proto_off.assign(poff.data_ptr<int64_t>(), poff.data_ptr<int64_t>() + num_samples + 1);
  const int64_t* c = counts.data_ptr<int64_t>();
  for (int64_t b = 0; b < num_samples; ++b) {
    p.row_off[b + 1] = p.row_off[b] + c[b];
  }
  p.vocab_chunk = std::max<int64_t>(1, std::min(chunk_size, vocab));
  // ~4M buffer elements: large enough for efficient GEMMs, small next to the [V, D] gradient.
  p.token_block = std::max<int64_t>(1, (int64_t{1} << 22) / chunk_size);
  return p;
}

inline at::ScalarType acc_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// out = a @ b in the accumulation type `out` has, from operands in the inputs' dtype or already
// in it, without ever rounding the product to half/bfloat16. On CUDA both operands go to the
// half type and cuBLAS writes its float32 accumulators out (mm.dtype, torch >= 2.8), so the GEMM
// stays on tensor cores; the CPU has no such GEMM, so there the (chunk-sized) operands are upcast.
inline void mm_acc_out(at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
  const auto acc = out.scalar_type();
  if (a.scalar_type() == acc && b.scalar_type() == acc) {
    at::mm_out(out, a, b);
    return;
  }
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 8)
  if (a.is_cuda()) {
    const auto half = a.scalar_type() == acc ? b.scalar_type() : a.scalar_type();
    at::mm_out(out, a.to(half), b.to(half), acc);
    return;
  }
#endif
  at::mm_out(out, a.to(acc), b.to(acc));
}

// Buffer view [rb, cb] over the first rb * cb elements of `buffer`.
inline at::Tensor chunk_view(const at::Tensor& buffer, int64_t rb, int64_t cb) {
  return buffer.narrow(0, 0, rb * cb).view({rb, cb});
}

// Calls fn(row_begin, row_end, is_vrt, first_table_row, first_col, ncols, first, last) for every
// (vocabulary chunk, token block), token blocks innermost: text chunks read rows of `weight`
// (columns = rows), VRT chunks of sample b read rows proto_off[b] + first_col ... of `protos`
// (first_col is the local VRT index). first / last mark a chunk's first and last token block, so
// the backward writes a chunk's grad_W rows once and accumulates into them while they are hot
// (no zero-filled [V, D] accumulator, no second pass over it).
template <typename Fn>
inline void for_each_chunk(const Plan& p, int64_t vocab, Fn fn) {
  const int64_t n = p.h.size(0);
  for (int64_t c0 = 0; c0 < vocab; c0 += p.vocab_chunk) {
    for (int64_t r0 = 0; r0 < n; r0 += p.token_block) {
      const int64_t r1 = std::min(n, r0 + p.token_block);
      fn(r0, r1, false, c0, c0, std::min(vocab - c0, p.vocab_chunk), r0 == 0, r1 == n);
    }
  }
  for (size_t b = 0; b + 1 < p.row_off.size(); ++b) {
    const int64_t p0 = p.proto_off[b], np = p.proto_off[b + 1] - p0;
    const int64_t rb0 = p.row_off[b], rb1 = p.row_off[b + 1];
    for (int64_t c0 = 0; rb1 > rb0 && c0 < np; c0 += p.vocab_chunk) {
      for (int64_t r0 = rb0; r0 < rb1; r0 += p.token_block) {
        const int64_t r1 = std::min(rb1, r0 + p.token_block);
        fn(r0, r1, true, p0 + c0, c0, std::min(np - c0, p.vocab_chunk), r0 == rb0, r1 == rb1);
      }
    }
  }
}

// out = a @ b (accumulate: out += a @ b) in out's dtype. With operands already in it this is one
// BLAS call writing out in place; otherwise (half inputs) the product goes through `scratch`.
inline void mm_into(at::Tensor out, const at::Tensor& a, const at::Tensor& b, bool accumulate,
                    const at::Tensor& scratch) {
  if (a.scalar_type() == out.scalar_type() && b.scalar_type() == out.scalar_type()) {
    if (accumulate) {
      out.addmm_(a, b);
    } else {
      at::mm_out(out, a, b);
    }
    return;
  }
  at::Tensor prod = chunk_view(scratch, out.size(0), out.size(1));
  mm_acc_out(prod, a, b);
  if (accumulate) {
    out.add_(prod);
  } else {
    out.copy_(prod);
  }
}

template <typename K>
std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& hidden_in, const at::Tensor& weight_in,
                                           const at::Tensor& protos_in,
                                           const at::Tensor& sample_index,
                                           const at::Tensor& proto_offsets,
                                           const at::Tensor& labels, const at::Tensor& ex_off_in,
                                           const at::Tensor& ex_ids_in, int64_t ignore_index,
                                           int64_t chunk_size) {
  check_inputs(hidden_in, weight_in, protos_in, sample_index, proto_offsets, labels, ex_off_in,
               ex_ids_in, ignore_index, chunk_size);
  const at::Tensor weight = weight_in.contiguous(), protos = protos_in.contiguous();
  const at::Tensor ex_off = ex_off_in.contiguous(), ex_ids = ex_ids_in.contiguous();
  const int64_t tokens = hidden_in.size(0), vocab = weight.size(0);
  const auto acc = acc_type(hidden_in.scalar_type());
  at::Tensor loss = at::zeros({tokens}, hidden_in.options().dtype(acc));
  at::Tensor lse = at::zeros({tokens}, hidden_in.options().dtype(acc));
  if (tokens == 0) {
    return {loss, lse};
  }
  const Plan p = make_plan(hidden_in, sample_index, proto_offsets, labels, ignore_index, vocab,
                           chunk_size);
  const int64_t n = p.h.size(0);
  if (n == 0) {
    return {loss, lse};
  }
  at::Tensor m = at::full({n}, -INFINITY, lse.options());
  at::Tensor s = at::zeros({n}, lse.options());
  at::Tensor buffer = at::empty({p.token_block * p.vocab_chunk}, lse.options());
  for_each_chunk(p, vocab, [&](int64_t r0, int64_t r1, bool is_vrt, int64_t row0, int64_t c0,
                               int64_t nc, bool, bool) {
    at::Tensor buf = chunk_view(buffer, r1 - r0, nc);
    const at::Tensor& table = is_vrt ? protos : weight;
    mm_acc_out(buf, p.h.narrow(0, r0, r1 - r0), table.narrow(0, row0, nc).t());
    if (is_vrt) {
      K::mask(buf, p.rows.narrow(0, r0, r1 - r0), ex_off, ex_ids, c0);
    }
    K::lse_update(buf, m.narrow(0, r0, r1 - r0), s.narrow(0, r0, r1 - r0));
  });
  const at::Tensor lse_rows = m + at::log(s);
  const at::Tensor target = K::label_logits(p.h, weight, protos, p.labels, p.proto_base);
  loss.index_copy_(0, p.rows, lse_rows - target);
  lse.index_copy_(0, p.rows, lse_rows);
  return {loss, lse};
}

template <typename K>
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& grad_loss, const at::Tensor& hidden_in, const at::Tensor& weight_in,
    const at::Tensor& protos_in, const at::Tensor& sample_index, const at::Tensor& proto_offsets,
    const at::Tensor& labels, const at::Tensor& ex_off_in, const at::Tensor& ex_ids_in,
    const at::Tensor& lse, int64_t ignore_index, int64_t chunk_size) {
  check_inputs(hidden_in, weight_in, protos_in, sample_index, proto_offsets, labels, ex_off_in,
               ex_ids_in, ignore_index, chunk_size);
  const int64_t tokens = hidden_in.size(0);
  TORCH_CHECK_VALUE(grad_loss.dim() == 1 && grad_loss.size(0) == tokens,
                    "grad_loss must have shape [", tokens, "], got ", grad_loss.sizes());
  TORCH_CHECK_VALUE(lse.dim() == 1 && lse.size(0) == tokens, "lse must have shape [", tokens,
                    "], got ", lse.sizes());
  check_same_device(hidden_in, grad_loss, "hidden", "grad_loss");
  check_same_device(hidden_in, lse, "hidden", "lse");
  check_dtype(lse, acc_type(hidden_in.scalar_type()), "lse");
  const at::Tensor weight = weight_in.contiguous(), protos = protos_in.contiguous();
  const at::Tensor ex_off = ex_off_in.contiguous(), ex_ids = ex_ids_in.contiguous();
  const auto dtype = hidden_in.scalar_type();
  const auto acc = acc_type(dtype);
  const auto zeros = [&] {
    return std::make_tuple(at::zeros_like(hidden_in, at::MemoryFormat::Contiguous),
                           at::zeros_like(weight, at::MemoryFormat::Contiguous),
                           at::zeros_like(protos, at::MemoryFormat::Contiguous));
  };
  if (tokens == 0) {
    return zeros();
  }
  const Plan p = make_plan(hidden_in, sample_index, proto_offsets, labels, ignore_index,
                           weight.size(0), chunk_size);
  const int64_t n = p.h.size(0);
  if (n == 0) {
    return zeros();
  }
  // With an active row every text row is written by its chunk's first token block: grad_weight
  // needs no zero fill; prototypes of samples without active rows stay 0. The gradients are in
  // the inputs' dtype: a half chunk accumulates in a float32 [chunk, D] scratch, written once
  // (no float32 [V, D] accumulator next to the output, no second pass over it).
  at::Tensor grad_hidden = at::zeros_like(hidden_in, at::MemoryFormat::Contiguous);
  at::Tensor grad_weight = at::empty_like(weight, at::MemoryFormat::Contiguous);
  at::Tensor grad_protos = at::zeros_like(protos, at::MemoryFormat::Contiguous);
  const int64_t dim = p.h.size(1);
  const at::Tensor g = grad_loss.index_select(0, p.rows).to(acc).contiguous();
  const at::Tensor lse_rows = lse.index_select(0, p.rows).contiguous();
  at::Tensor grad_h = at::zeros({n, dim}, lse.options());
  at::Tensor buffer = at::empty({p.token_block * p.vocab_chunk}, lse.options());
  const bool half = dtype != acc;
  // Half inputs only: the product of one GEMM, and the chunk's float32 grad rows.
  at::Tensor product, chunk_grad;
  if (half) {
    product = at::empty({std::max(p.token_block, p.vocab_chunk) * dim}, lse.options());
    chunk_grad = at::empty({p.vocab_chunk * dim}, lse.options());
  }
  const int64_t vocab = weight.size(0);
  for_each_chunk(p, vocab, [&](int64_t r0, int64_t r1, bool is_vrt, int64_t row0, int64_t c0,
                               int64_t nc, bool first_block, bool last_block) {
    const int64_t rb = r1 - r0;
    at::Tensor buf = chunk_view(buffer, rb, nc);
    const at::Tensor hb = p.h.narrow(0, r0, rb);
    const at::Tensor rows_tab = (is_vrt ? protos : weight).narrow(0, row0, nc);
    mm_acc_out(buf, hb, rows_tab.t());
    if (is_vrt) {
      K::mask(buf, p.rows.narrow(0, r0, rb), ex_off, ex_ids, c0);
    }
    // Columns of this chunk are label ids (is_vrt ? vocab : 0) + c0 + j.
    K::softmax_grad(buf, lse_rows.narrow(0, r0, rb), g.narrow(0, r0, rb),
                    p.labels.narrow(0, r0, rb), (is_vrt ? vocab : 0) + c0);
    mm_into(grad_h.narrow(0, r0, rb), buf, rows_tab, /*accumulate=*/true, product);
    // Chunks own disjoint rows of grad_weight / grad_protos: race-free accumulation.
    at::Tensor out = (is_vrt ? grad_protos : grad_weight).narrow(0, row0, nc);
    if (!half) {
      mm_into(out, buf.t(), hb, !first_block, product);
      return;
    }
    at::Tensor acc_rows = chunk_view(chunk_grad, nc, dim);
    mm_into(acc_rows, buf.t(), hb, !first_block, product);
    if (last_block) {  // write the chunk's rows once, in the inputs' dtype
      out.copy_(acc_rows);
    }
  });
  grad_hidden.index_copy_(0, p.rows, grad_h.to(dtype));
  return std::make_tuple(grad_hidden, grad_weight, grad_protos);
}

}  // namespace vrt_ce
}  // namespace trp
