// CUDA launcher of match_cost: a grid-stride loop over the packed [Q * G] index space, calling
// the same per-element math as the CPU launcher (match_cost.h), accumulating in opmath.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include "cuda_launch.cuh"
#include "match_cost/match_cost.h"

namespace trp {
namespace match_cost {
namespace {

template <typename scalar_t>
struct DeviceLoad {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* cls;
  const scalar_t* pred;
  const scalar_t* tgt;
  __device__ acc_t class_cost(int64_t i) const { return static_cast<acc_t>(cls[i]); }
  __device__ acc_t pred_box(int64_t i) const { return static_cast<acc_t>(pred[i]); }
  __device__ acc_t tgt_box(int64_t i) const { return static_cast<acc_t>(tgt[i]); }
};

template <typename scalar_t>
__global__ void match_cost_kernel(DeviceLoad<scalar_t> load, const int64_t* offsets,
                                  const int64_t* labels, scalar_t* out, int64_t total,
                                  int64_t num_images, int64_t num_queries, int64_t num_classes,
                                  at::opmath_type<scalar_t> wc, at::opmath_type<scalar_t> wb,
                                  at::opmath_type<scalar_t> wg) {
  using acc_t = at::opmath_type<scalar_t>;
  TRP_GRID_STRIDE_LOOP(k, total) {
    out[k] = static_cast<scalar_t>(element_cost<acc_t>(k, offsets, num_images, num_queries,
                                                       num_classes, load, labels, wc, wb, wg));
  }
}

at::Tensor match_cost_cuda(const at::Tensor& class_cost_in, const at::Tensor& pred_boxes_in,
                           const at::Tensor& tgt_labels_in, const at::Tensor& tgt_boxes_in,
                           const at::Tensor& tgt_offsets_in, double weight_class,
                           double weight_bbox, double weight_giou) {
  check_inputs(class_cost_in, pred_boxes_in, tgt_labels_in, tgt_boxes_in, tgt_offsets_in);
  const c10::cuda::CUDAGuard guard(class_cost_in.device());
  const at::Tensor class_cost = class_cost_in.contiguous();
  const at::Tensor pred_boxes = pred_boxes_in.contiguous();
  const at::Tensor tgt_labels = tgt_labels_in.contiguous();
  const at::Tensor tgt_boxes = tgt_boxes_in.contiguous();
  const at::Tensor offsets = tgt_offsets_in.contiguous();
  const int64_t num_images = class_cost.size(0), num_queries = class_cost.size(1);
  const int64_t num_classes = class_cost.size(2), total = num_queries * tgt_boxes.size(0);
  at::Tensor out = at::empty({total}, class_cost.options());
  if (total == 0) {
    return out;
  }
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, class_cost.scalar_type(),
                                  "trp::match_cost_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const DeviceLoad<scalar_t> load{class_cost.const_data_ptr<scalar_t>(),
                                    pred_boxes.const_data_ptr<scalar_t>(),
                                    tgt_boxes.const_data_ptr<scalar_t>()};
    match_cost_kernel<scalar_t><<<grid_for(total), kThreads, 0, stream>>>(
        load, offsets.const_data_ptr<int64_t>(), tgt_labels.const_data_ptr<int64_t>(),
        out.mutable_data_ptr<scalar_t>(), total, num_images, num_queries, num_classes,
        static_cast<acc_t>(weight_class), static_cast<acc_t>(weight_bbox),
        static_cast<acc_t>(weight_giou));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace
}  // namespace match_cost
}  // namespace trp

TORCH_LIBRARY_IMPL(trp, CUDA, m) {
  m.impl("match_cost", &trp::match_cost::match_cost_cuda);
}
