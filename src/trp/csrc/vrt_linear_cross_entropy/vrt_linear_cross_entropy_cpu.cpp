// CPU launcher of vrt_linear_cross_entropy: the chunked driver of the header with
// at::parallel_for kernels over buffer rows; each row calls the shared per-element math.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "vrt_linear_cross_entropy/vrt_linear_cross_entropy.h"
#include "cpu_capability.h"

namespace trp {
namespace vrt_ce {
namespace {

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
          lse_update_row<scalar_t>(b + r * cols, cols, mp + r, sp + r);
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
      at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
          scalar_t* row = b + r * cols;
          const int64_t label_col = lab[r] - col_base;
          for (int64_t c = 0; c < cols; ++c) {
            row[c] = vrt_ce::softmax_grad<scalar_t>(row[c], l[r], gp[r], c == label_col);
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
