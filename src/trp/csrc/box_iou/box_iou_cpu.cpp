// CPU launcher of box_iou / generalized_box_iou: at::parallel_for over the pair index space.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "box_iou/box_iou.h"
#include "cpu_capability.h"

namespace trp {
namespace box_iou {
namespace {

at::Tensor forward_cpu(const at::Tensor& boxes1_in, const at::Tensor& boxes2_in,
                       bool generalized) {
  check_inputs(boxes1_in, boxes2_in);
  const at::Tensor boxes1 = boxes1_in.contiguous();
  const at::Tensor boxes2 = boxes2_in.contiguous();
  const int64_t n = boxes1.size(0), m = boxes2.size(0);
  at::Tensor out = at::empty({n, m}, boxes1.options());
  if (n == 0 || m == 0) {
    return out;
  }
  AT_DISPATCH_FLOATING_TYPES(boxes1.scalar_type(), "trp::box_iou_cpu", [&] {
    const scalar_t* b1 = boxes1.const_data_ptr<scalar_t>();
    const scalar_t* b2 = boxes2.const_data_ptr<scalar_t>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, n * m, 2048, [&](int64_t begin, int64_t end) {
      for (int64_t k = begin; k < end; ++k) {
        o[k] = pair_iou(b1 + 4 * (k / m), b2 + 4 * (k % m), generalized);
      }
    });
  });
  return out;
}

at::Tensor box_iou_cpu(const at::Tensor& boxes1, const at::Tensor& boxes2) {
  return forward_cpu(boxes1, boxes2, false);
}

at::Tensor generalized_box_iou_cpu(const at::Tensor& boxes1, const at::Tensor& boxes2) {
  return forward_cpu(boxes1, boxes2, true);
}

// Two race-free passes: rows own grad_boxes1[i], columns own grad_boxes2[j].
std::tuple<at::Tensor, at::Tensor> box_iou_backward_cpu(const at::Tensor& grad_in,
                                                        const at::Tensor& boxes1_in,
                                                        const at::Tensor& boxes2_in,
                                                        bool generalized) {
  check_backward_inputs(grad_in, boxes1_in, boxes2_in);
  const at::Tensor grad = grad_in.contiguous();
  const at::Tensor boxes1 = boxes1_in.contiguous();
  const at::Tensor boxes2 = boxes2_in.contiguous();
  const int64_t n = boxes1.size(0), m = boxes2.size(0);
  at::Tensor grad1 = at::zeros_like(boxes1);
  at::Tensor grad2 = at::zeros_like(boxes2);
  if (n == 0 || m == 0) {
    return {grad1, grad2};
  }
  AT_DISPATCH_FLOATING_TYPES(boxes1.scalar_type(), "trp::box_iou_backward_cpu", [&] {
    const scalar_t* b1 = boxes1.const_data_ptr<scalar_t>();
    const scalar_t* b2 = boxes2.const_data_ptr<scalar_t>();
    const scalar_t* g = grad.const_data_ptr<scalar_t>();
    scalar_t* g1 = grad1.mutable_data_ptr<scalar_t>();
    scalar_t* g2 = grad2.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, n, 64, [&](int64_t begin, int64_t end) {
      scalar_t unused[4] = {0, 0, 0, 0};
      for (int64_t i = begin; i < end; ++i) {
        for (int64_t j = 0; j < m; ++j) {
          pair_iou_backward(b1 + 4 * i, b2 + 4 * j, generalized, g[i * m + j], g1 + 4 * i,
                            unused);
        }
      }
    });
    at::parallel_for(0, m, 64, [&](int64_t begin, int64_t end) {
      scalar_t unused[4] = {0, 0, 0, 0};
      for (int64_t j = begin; j < end; ++j) {
        for (int64_t i = 0; i < n; ++i) {
          pair_iou_backward(b1 + 4 * i, b2 + 4 * j, generalized, g[i * m + j], unused,
                            g2 + 4 * j);
        }
      }
    });
  });
  return {grad1, grad2};
}

}  // namespace
}  // namespace box_iou
}  // namespace trp

TRP_CPU_KERNELS(box_iou, m) {
  m.impl("box_iou", &trp::box_iou::box_iou_cpu);
  m.impl("generalized_box_iou", &trp::box_iou::generalized_box_iou_cpu);
  m.impl("box_iou_backward", &trp::box_iou::box_iou_backward_cpu);
}
