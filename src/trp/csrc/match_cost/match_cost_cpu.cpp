// CPU launcher of match_cost: at::parallel_for over the packed [Q * G] index space.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "match_cost/match_cost.h"
#include "cpu_capability.h"

namespace trp {
namespace match_cost {
namespace {

template <typename scalar_t>
struct HostLoad {
  const scalar_t* cls;
  const scalar_t* pred;
  const scalar_t* tgt;
  scalar_t class_cost(int64_t i) const { return cls[i]; }
  scalar_t pred_box(int64_t i) const { return pred[i]; }
  scalar_t tgt_box(int64_t i) const { return tgt[i]; }
};

at::Tensor match_cost_cpu(const at::Tensor& class_cost_in, const at::Tensor& pred_boxes_in,
                          const at::Tensor& tgt_labels_in, const at::Tensor& tgt_boxes_in,
                          const at::Tensor& tgt_offsets_in, double weight_class,
                          double weight_bbox, double weight_giou) {
  check_inputs(class_cost_in, pred_boxes_in, tgt_labels_in, tgt_boxes_in, tgt_offsets_in);
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
  AT_DISPATCH_FLOATING_TYPES(class_cost.scalar_type(), "trp::match_cost_cpu", [&] {
    const HostLoad<scalar_t> load{class_cost.const_data_ptr<scalar_t>(),
                                  pred_boxes.const_data_ptr<scalar_t>(),
                                  tgt_boxes.const_data_ptr<scalar_t>()};
    const int64_t* off = offsets.const_data_ptr<int64_t>();
    const int64_t* labels = tgt_labels.const_data_ptr<int64_t>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    const auto wc = static_cast<scalar_t>(weight_class);
    const auto wb = static_cast<scalar_t>(weight_bbox);
    const auto wg = static_cast<scalar_t>(weight_giou);
    at::parallel_for(0, total, 4096, [&](int64_t begin, int64_t end) {
      for (int64_t k = begin; k < end; ++k) {
        o[k] = element_cost<scalar_t>(k, off, num_images, num_queries, num_classes, load, labels,
                                      wc, wb, wg);
      }
    });
  });
  return out;
}

}  // namespace
}  // namespace match_cost
}  // namespace trp

TRP_CPU_KERNELS(match_cost, m) {
  m.impl("match_cost", &trp::match_cost::match_cost_cpu);
}
