// CUDA launcher of oks: a grid-stride loop over the packed [Q * G] index space calling the same
// per-element math as the CPU launcher (oks.h), in opmath.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include "cuda_launch.cuh"
#include "oks/oks.h"

namespace trp {
namespace oks {
namespace {

template <typename scalar_t>
struct DeviceLoad {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t *pred_, *tgt_, *vis_, *areas_, *sigmas_;
  __device__ acc_t pred(int64_t i) const { return static_cast<acc_t>(pred_[i]); }
  __device__ acc_t tgt(int64_t i) const { return static_cast<acc_t>(tgt_[i]); }
  __device__ acc_t visibility(int64_t i) const { return static_cast<acc_t>(vis_[i]); }
  __device__ acc_t area(int64_t i) const { return static_cast<acc_t>(areas_[i]); }
  __device__ acc_t sigma(int64_t i) const { return static_cast<acc_t>(sigmas_[i]); }
};

template <typename scalar_t>
__global__ void oks_kernel(DeviceLoad<scalar_t> load, const int64_t* offsets, scalar_t* out,
                           int64_t total, int64_t num_images, int64_t num_queries,
                           int64_t num_keypoints) {
  using acc_t = at::opmath_type<scalar_t>;
  TRP_GRID_STRIDE_LOOP(k, total) {
    out[k] = static_cast<scalar_t>(
        element_oks<acc_t>(k, offsets, num_images, num_queries, num_keypoints, load));
  }
}

at::Tensor oks_cuda(const at::Tensor& pred_in, const at::Tensor& tgt_in, const at::Tensor& vis_in,
                    const at::Tensor& areas_in, const at::Tensor& sigmas_in,
                    const at::Tensor& offsets_in) {
  check_inputs(pred_in, tgt_in, vis_in, areas_in, sigmas_in, offsets_in);
  const c10::cuda::CUDAGuard guard(pred_in.device());
  const at::Tensor pred = pred_in.contiguous(), tgt = tgt_in.contiguous();
  const at::Tensor vis = vis_in.contiguous(), areas = areas_in.contiguous();
  const at::Tensor sigmas = sigmas_in.contiguous(), offsets = offsets_in.contiguous();
  const int64_t num_images = pred.size(0), num_queries = pred.size(1);
  const int64_t num_keypoints = pred.size(2), total = num_queries * tgt.size(0);
  at::Tensor out = at::empty({total}, pred.options());
  if (total == 0) {
    return out;
  }
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pred.scalar_type(), "trp::oks_cuda",
                                  [&] {
    const DeviceLoad<scalar_t> load{
        pred.const_data_ptr<scalar_t>(), tgt.const_data_ptr<scalar_t>(),
        vis.const_data_ptr<scalar_t>(), areas.const_data_ptr<scalar_t>(),
        sigmas.const_data_ptr<scalar_t>()};
    oks_kernel<scalar_t><<<grid_for(total), kThreads, 0, stream>>>(
        load, offsets.const_data_ptr<int64_t>(), out.mutable_data_ptr<scalar_t>(), total,
        num_images, num_queries, num_keypoints);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace
}  // namespace oks
}  // namespace trp

TORCH_LIBRARY_IMPL(trp, CUDA, m) {
  m.impl("oks", &trp::oks::oks_cuda);
}
