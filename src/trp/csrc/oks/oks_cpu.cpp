// CPU launcher of oks: at::parallel_for over the packed [Q * G] index space.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "oks/oks.h"
#include "cpu_capability.h"

namespace trp {
namespace oks {
namespace {

template <typename scalar_t>
struct HostLoad {
  const scalar_t *pred_, *tgt_, *vis_, *areas_, *sigmas_;
  scalar_t pred(int64_t i) const { return pred_[i]; }
  scalar_t tgt(int64_t i) const { return tgt_[i]; }
  scalar_t visibility(int64_t i) const { return vis_[i]; }
  scalar_t area(int64_t i) const { return areas_[i]; }
  scalar_t sigma(int64_t i) const { return sigmas_[i]; }
};

at::Tensor oks_cpu(const at::Tensor& pred_in, const at::Tensor& tgt_in, const at::Tensor& vis_in,
                   const at::Tensor& areas_in, const at::Tensor& sigmas_in,
                   const at::Tensor& offsets_in) {
  check_inputs(pred_in, tgt_in, vis_in, areas_in, sigmas_in, offsets_in);
  const at::Tensor pred = pred_in.contiguous(), tgt = tgt_in.contiguous();
  const at::Tensor vis = vis_in.contiguous(), areas = areas_in.contiguous();
  const at::Tensor sigmas = sigmas_in.contiguous(), offsets = offsets_in.contiguous();
  const int64_t num_images = pred.size(0), num_queries = pred.size(1);
  const int64_t num_keypoints = pred.size(2), total = num_queries * tgt.size(0);
  at::Tensor out = at::empty({total}, pred.options());
  if (total == 0) {
    return out;
  }
  AT_DISPATCH_FLOATING_TYPES(pred.scalar_type(), "trp::oks_cpu", [&] {
    const HostLoad<scalar_t> load{pred.const_data_ptr<scalar_t>(), tgt.const_data_ptr<scalar_t>(),
                                  vis.const_data_ptr<scalar_t>(), areas.const_data_ptr<scalar_t>(),
                                  sigmas.const_data_ptr<scalar_t>()};
    const int64_t* off = offsets.const_data_ptr<int64_t>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, total, 2048, [&](int64_t begin, int64_t end) {
      for (int64_t k = begin; k < end; ++k) {
        o[k] = element_oks<scalar_t>(k, off, num_images, num_queries, num_keypoints, load);
      }
    });
  });
  return out;
}

}  // namespace
}  // namespace oks
}  // namespace trp

TRP_CPU_KERNELS(oks, m) {
  m.impl("oks", &trp::oks::oks_cpu);
}
