// CUDA launcher of vrt_linear_cross_entropy: the same chunked driver as the CPU (the chunk
// products are at::mm, i.e. cuBLAS) with grid-stride kernels for the elementwise part, which call
// the shared math of vrt_linear_cross_entropy.h; the buffer is in the accumulation type. The
// log-sum-exp of a buffer row (one token's chunk, up to chunk_size logits) is one block: each
// thread folds a strided slice into an LseState, and the block merges them in shared memory (a
// thread per row left most of 132 SMs idle and read each row serially). The mask runs one thread
// per row (a few excluded ids each); the softmax gradient one thread per buffer element.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include "cuda_launch.cuh"
#include "vrt_linear_cross_entropy/vrt_linear_cross_entropy.h"

namespace trp {
namespace vrt_ce {
namespace {

template <typename scalar_t, typename acc_t>
__global__ void lse_kernel(const scalar_t* buf, acc_t* m, acc_t* s, int64_t rows, int64_t cols) {
  // Launched with kThreads (a power of two) threads per block: the tree below halves it.
  __shared__ acc_t shared_m[kThreads];
  __shared__ acc_t shared_s[kThreads];
  const unsigned int t = threadIdx.x;
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    auto state = LseState<acc_t>::empty();
    for (int64_t c = t; c < cols; c += blockDim.x) {
      state.add(static_cast<acc_t>(buf[r * cols + c]));
    }
    shared_m[t] = state.m;
    shared_s[t] = state.s;
    __syncthreads();
    for (unsigned int stride = blockDim.x / 2; stride > 0; stride /= 2) {
      if (t < stride) {
        LseState<acc_t> a{shared_m[t], shared_s[t]};
        a.merge(shared_m[t + stride], shared_s[t + stride]);
        shared_m[t] = a.m;
        shared_s[t] = a.s;
      }
      __syncthreads();
    }
    if (t == 0) {
      LseState<acc_t> running{m[r], s[r]};
      running.merge(shared_m[0], shared_s[0]);
      m[r] = running.m;
      s[r] = running.s;
    }
    __syncthreads();  // the next row reuses the shared arrays
  }
}

template <typename scalar_t>
__global__ void mask_kernel(scalar_t* buf, const int64_t* tokens, const int64_t* off,
                            const int64_t* ids, int64_t rows, int64_t cols, int64_t col_start) {
  TRP_GRID_STRIDE_LOOP(r, rows) { mask_row(buf + r * cols, off, ids, tokens[r], col_start, cols); }
}

template <typename scalar_t, typename acc_t>
__global__ void grad_kernel(scalar_t* buf, const acc_t* lse, const acc_t* g, const int64_t* labels,
                            int64_t rows, int64_t cols, int64_t col_base) {
  TRP_GRID_STRIDE_LOOP(i, rows * cols) {
    const int64_t r = i / cols, c = i % cols;
    buf[i] = static_cast<scalar_t>(vrt_ce::softmax_grad<acc_t>(
        static_cast<acc_t>(buf[i]), lse[r], g[r], c == labels[r] - col_base));
  }
}

template <typename scalar_t, typename acc_t>
__global__ void label_kernel(const scalar_t* h, const scalar_t* w, const scalar_t* p,
                             const int64_t* labels, const int64_t* base, acc_t* out, int64_t rows,
                             int64_t vocab, int64_t dim) {
  TRP_GRID_STRIDE_LOOP(r, rows) {
    out[r] = label_logit<acc_t>(h + r * dim, w, p, labels[r], base[r], vocab, dim);
  }
}

#define TRP_VRT_CE_DISPATCH(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

struct CudaKernels {
  static void lse_update(const at::Tensor& buf, const at::Tensor& m, const at::Tensor& s) {
    const int64_t rows = buf.size(0), cols = buf.size(1);
    const auto stream = c10::cuda::getCurrentCUDAStream();
    TRP_VRT_CE_DISPATCH(buf.scalar_type(), "trp::vrt_ce_lse_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const auto blocks = static_cast<unsigned int>(std::max<int64_t>(1, std::min<int64_t>(rows, int64_t{1} << 20)));
      lse_kernel<scalar_t, acc_t><<<blocks, kThreads, 0, stream>>>(
          buf.const_data_ptr<scalar_t>(), m.mutable_data_ptr<acc_t>(),
          s.mutable_data_ptr<acc_t>(), rows, cols);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  static void mask(const at::Tensor& buf, const at::Tensor& tokens, const at::Tensor& ex_off,
                   const at::Tensor& ex_ids, int64_t col_start) {
    if (ex_ids.numel() == 0) {
      return;
    }
    const int64_t rows = buf.size(0), cols = buf.size(1);
    const auto stream = c10::cuda::getCurrentCUDAStream();
    TRP_VRT_CE_DISPATCH(buf.scalar_type(), "trp::vrt_ce_mask_cuda", [&] {
      mask_kernel<scalar_t><<<grid_for(rows), kThreads, 0, stream>>>(
          buf.mutable_data_ptr<scalar_t>(), tokens.const_data_ptr<int64_t>(),
          ex_off.const_data_ptr<int64_t>(), ex_ids.const_data_ptr<int64_t>(), rows, cols,
          col_start);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  static void softmax_grad(const at::Tensor& buf, const at::Tensor& lse, const at::Tensor& g,
                           const at::Tensor& labels, int64_t col_base) {
    const int64_t rows = buf.size(0), cols = buf.size(1);
    const auto stream = c10::cuda::getCurrentCUDAStream();
    TRP_VRT_CE_DISPATCH(buf.scalar_type(), "trp::vrt_ce_grad_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      grad_kernel<scalar_t, acc_t><<<grid_for(rows * cols), kThreads, 0, stream>>>(
          buf.mutable_data_ptr<scalar_t>(), lse.const_data_ptr<acc_t>(),
          g.const_data_ptr<acc_t>(), labels.const_data_ptr<int64_t>(), rows, cols, col_base);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  static at::Tensor label_logits(const at::Tensor& h, const at::Tensor& weight,
                                 const at::Tensor& protos, const at::Tensor& labels,
                                 const at::Tensor& proto_base) {
    const int64_t rows = h.size(0), dim = h.size(1), vocab = weight.size(0);
    at::Tensor out = at::empty({rows}, h.options().dtype(acc_type(h.scalar_type())));
    const auto stream = c10::cuda::getCurrentCUDAStream();
    TRP_VRT_CE_DISPATCH(h.scalar_type(), "trp::vrt_ce_label_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      label_kernel<scalar_t, acc_t><<<grid_for(rows), kThreads, 0, stream>>>(
          h.const_data_ptr<scalar_t>(), weight.const_data_ptr<scalar_t>(),
          protos.const_data_ptr<scalar_t>(), labels.const_data_ptr<int64_t>(),
          proto_base.const_data_ptr<int64_t>(), out.mutable_data_ptr<acc_t>(), rows, vocab, dim);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return out;
  }
};

std::tuple<at::Tensor, at::Tensor> forward_cuda(const at::Tensor& hidden, const at::Tensor& weight,
                                                const at::Tensor& protos,
                                                const at::Tensor& sample_index,
                                                const at::Tensor& proto_offsets,
                                                const at::Tensor& labels,
                                                const at::Tensor& ex_off, const at::Tensor& ex_ids,
                                                int64_t ignore_index, int64_t chunk_size) {
  const c10::cuda::CUDAGuard guard(hidden.device());
  return forward<CudaKernels>(hidden, weight, protos, sample_index, proto_offsets, labels, ex_off,
                              ex_ids, ignore_index, chunk_size);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cuda(
    const at::Tensor& grad_loss, const at::Tensor& hidden, const at::Tensor& weight,
    const at::Tensor& protos, const at::Tensor& sample_index, const at::Tensor& proto_offsets,
    const at::Tensor& labels, const at::Tensor& ex_off, const at::Tensor& ex_ids,
    const at::Tensor& lse, int64_t ignore_index, int64_t chunk_size) {
  const c10::cuda::CUDAGuard guard(hidden.device());
  return backward<CudaKernels>(grad_loss, hidden, weight, protos, sample_index, proto_offsets,
                               labels, ex_off, ex_ids, lse, ignore_index, chunk_size);
}

}  // namespace
}  // namespace vrt_ce
}  // namespace trp

TORCH_LIBRARY_IMPL(trp, CUDA, m) {
  m.impl("vrt_linear_cross_entropy", &trp::vrt_ce::forward_cuda);
  m.impl("vrt_linear_cross_entropy_backward", &trp::vrt_ce::backward_cuda);
}
