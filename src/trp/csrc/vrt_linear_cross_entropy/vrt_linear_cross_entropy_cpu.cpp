// CPU launcher of vrt_linear_cross_entropy: the chunked driver of the header with
// at::parallel_for kernels over buffer rows. The two passes over every buffer element (the
// log-sum-exp in the forward, the softmax gradient in the backward) run in at::vec::Vectorized
// (this unit is built per instruction set): a row's max, then the sum of exp(x − max), folded
// into the running state with the shared LseState::merge; the gradient is g · exp(x − lse) with
// the label column corrected afterwards, the same formula as the shared softmax_grad.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>

#include "vrt_linear_cross_entropy/vrt_linear_cross_entropy.h"
#include "cpu_capability.h"

namespace trp {
namespace vrt_ce {
namespace {

using at::vec::Vectorized;

// (max, Σ exp(x − max)) of one buffer row; (−inf, 0) when every entry is −inf (excluded).
template <typename scalar_t>
LseState<scalar_t> row_lse(const scalar_t* row, int64_t n) {
  using Vec = Vectorized<scalar_t>;
  constexpr int64_t lanes = Vec::size();
  const int64_t nv = n - n % lanes;
  scalar_t mx = neg_inf<scalar_t>();
  if (nv > 0) {
    Vec vmax = Vec::loadu(row);
    for (int64_t i = lanes; i < nv; i += lanes) {
      vmax = at::vec::maximum(vmax, Vec::loadu(row + i));
    }
    scalar_t lanes_max[lanes];
    vmax.store(lanes_max);
    for (int64_t k = 0; k < lanes; ++k) {
      mx = std::max(mx, lanes_max[k]);
    }
  }
  for (int64_t i = nv; i < n; ++i) {
    mx = std::max(mx, row[i]);
  }
  if (mx == neg_inf<scalar_t>()) {
    return LseState<scalar_t>::empty();
  }
  const Vec vm(mx);
  Vec vsum(scalar_t(0));
  for (int64_t i = 0; i < nv; i += lanes) {
    vsum = vsum + (Vec::loadu(row + i) - vm).exp();
  }
  scalar_t lanes_sum[lanes];
  vsum.store(lanes_sum);
  scalar_t sum = 0;
  for (int64_t k = 0; k < lanes; ++k) {
    sum += lanes_sum[k];
  }
  for (int64_t i = nv; i < n; ++i) {
    sum += exp_(row[i] - mx);
  }
  return {mx, sum};
}

struct CpuKernels {
  // buf [R, C]; m, s [R] (acc dtype): fold the chunk into the running log-sum-exp.
  static void lse_update(const at::Tensor& buf, const at::Tensor& m, const at::Tensor& s) {
    const int64_t rows = buf.size(0), cols = buf.size(1);
    AT_DISPATCH_FLOATING_TYPES(buf.scalar_type(), "trp::vrt_ce_lse_cpu", [&] {
      const scalar_t* b = buf.const_data_ptr<scalar_t>();
      scalar_t* mp = m.mutable_data_ptr<scalar_t>();
      scalar_t* sp = s.mutable_data_ptr<scalar_t>();
      at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
          const LseState<scalar_t> chunk = row_lse(b + r * cols, cols);
          LseState<scalar_t> running{mp[r], sp[r]};
          running.merge(chunk.m, chunk.s);
          mp[r] = running.m;
          sp[r] = running.s;
        }
      });
    });
  }

  // Excluded VRT columns of each row's token -> -inf (chunk starts at local index col_start).
  static void mask(const at::Tensor& buf, const at::Tensor& tokens, const at::Tensor& ex_off,
                   const at::Tensor& ex_ids, int64_t col_start) {
    if (ex_ids.numel() == 0) {
      return;
    }
    const int64_t rows = buf.size(0), cols = buf.size(1);
    AT_DISPATCH_FLOATING_TYPES(buf.scalar_type(), "trp::vrt_ce_mask_cpu", [&] {
      scalar_t* b = buf.mutable_data_ptr<scalar_t>();
      const int64_t* tok = tokens.const_data_ptr<int64_t>();
      const int64_t* off = ex_off.const_data_ptr<int64_t>();
      const int64_t* ids = ex_ids.const_data_ptr<int64_t>();
      at::parallel_for(0, rows, 64, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
          mask_row(b + r * cols, off, ids, tok[r], col_start, cols);
        }
      });
    });
  }

  // In place: buf <- g * (softmax - onehot(label)); column j is label id col_base + j.
  static void softmax_grad(const at::Tensor& buf, const at::Tensor& lse, const at::Tensor& g,
                           const at::Tensor& labels, int64_t col_base) {
    const int64_t rows = buf.size(0), cols = buf.size(1);
    AT_DISPATCH_FLOATING_TYPES(buf.scalar_type(), "trp::vrt_ce_grad_cpu", [&] {
      scalar_t* b = buf.mutable_data_ptr<scalar_t>();
      const scalar_t* l = lse.const_data_ptr<scalar_t>();
      const scalar_t* gp = g.const_data_ptr<scalar_t>();
      const int64_t* lab = labels.const_data_ptr<int64_t>();
      using Vec = Vectorized<scalar_t>;
      constexpr int64_t lanes = Vec::size();
      const int64_t nv = cols - cols % lanes;
      at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
          scalar_t* row = b + r * cols;
          const Vec vl(l[r]), vg(gp[r]);
          for (int64_t c = 0; c < nv; c += lanes) {
            (vg * (Vec::loadu(row + c) - vl).exp()).store(row + c);
          }
          for (int64_t c = nv; c < cols; ++c) {
            row[c] = vrt_ce::softmax_grad<scalar_t>(row[c], l[r], gp[r], false);
          }
          const int64_t label_col = lab[r] - col_base;
          if (label_col >= 0 && label_col < cols) {
            row[label_col] -= gp[r];  // softmax_grad's − g at the label
          }
        }
      });
    });
  }

  static at::Tensor label_logits(const at::Tensor& h, const at::Tensor& weight,
                                 const at::Tensor& protos, const at::Tensor& labels,
                                 const at::Tensor& proto_base) {
    const int64_t rows = h.size(0), dim = h.size(1), vocab = weight.size(0);
    at::Tensor out = at::empty({rows}, h.options().dtype(acc_type(h.scalar_type())));
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(),
                                    "trp::vrt_ce_label_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const scalar_t* hp = h.const_data_ptr<scalar_t>();
      const scalar_t* w = weight.const_data_ptr<scalar_t>();
      const scalar_t* pp = protos.const_data_ptr<scalar_t>();
      const int64_t* lab = labels.const_data_ptr<int64_t>();
      const int64_t* base = proto_base.const_data_ptr<int64_t>();
      acc_t* o = out.mutable_data_ptr<acc_t>();
      at::parallel_for(0, rows, 64, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
          o[r] = label_logit<acc_t>(hp + r * dim, w, pp, lab[r], base[r], vocab, dim);
        }
      });
    });
    return out;
  }
};

// Half inputs are accumulated in float32 by the shared driver (as on CUDA).
void check_cpu_dtype(const at::Tensor& hidden) {
  const auto t = hidden.scalar_type();
  TORCH_CHECK_TYPE(t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16,
                   "vrt_linear_cross_entropy on CPU supports float16, bfloat16, float32 and "
                   "float64, got ", t);
}

std::tuple<at::Tensor, at::Tensor> forward_cpu(const at::Tensor& hidden, const at::Tensor& weight,
                                               const at::Tensor& protos,
                                               const at::Tensor& sample_index,
                                               const at::Tensor& proto_offsets,
                                               const at::Tensor& labels, const at::Tensor& ex_off,
                                               const at::Tensor& ex_ids, int64_t ignore_index,
                                               int64_t chunk_size) {
  check_floating(hidden, "hidden");
  check_cpu_dtype(hidden);
  return forward<CpuKernels>(hidden, weight, protos, sample_index, proto_offsets, labels, ex_off,
                             ex_ids, ignore_index, chunk_size);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cpu(
    const at::Tensor& grad_loss, const at::Tensor& hidden, const at::Tensor& weight,
    const at::Tensor& protos, const at::Tensor& sample_index, const at::Tensor& proto_offsets,
    const at::Tensor& labels, const at::Tensor& ex_off, const at::Tensor& ex_ids,
    const at::Tensor& lse, int64_t ignore_index, int64_t chunk_size) {
  check_floating(hidden, "hidden");
  check_cpu_dtype(hidden);
  return backward<CpuKernels>(grad_loss, hidden, weight, protos, sample_index, proto_offsets,
                              labels, ex_off, ex_ids, lse, ignore_index, chunk_size);
}

}  // namespace
}  // namespace vrt_ce
}  // namespace trp

TRP_CPU_KERNELS(vrt_linear_cross_entropy, m) {
  m.impl("vrt_linear_cross_entropy", &trp::vrt_ce::forward_cpu);
  m.impl("vrt_linear_cross_entropy_backward", &trp::vrt_ce::backward_cpu);
}
