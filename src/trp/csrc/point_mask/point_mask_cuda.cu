// CUDA launcher of point_mask_logits / point_mask_loss and their backward ops: one thread per
// (query, point) computes the logit as sum_c embed[q, c] * bilinear(features[b, c], point) with
// the shared math of point_mask.h (the CPU launcher computes the same values through chunked
// GEMMs instead, which is what is fast on a CPU). Per-query sums are a block reduction per query.
// Backward: grad_embed[q] = sum_p dlogit[q, p] * bilinear(features[b], point[q, p]) is a batched
// GEMM over a gathered [queries, C, P] tensor of sampled features (chunks of queries, no atomics:
// every (query, point) thread adding into the same grad_embed row contended and made the sum's
// order nondeterministic). grad_features still uses atomics: points of different queries of an
// image (and neighbouring points of one query) share pixels, and a race-free partition by image
// and channel would serialise a whole image's points into a few blocks; it alerts under
// torch.use_deterministic_algorithms. Gradients accumulate in opmath (float for half/bfloat16)
// and are cast once at the end.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Context.h>
#include <torch/library.h>

#include <algorithm>

#include "cuda_launch.cuh"
#include "point_mask/point_mask.h"
#include "point_mask/point_mask_reduce.cuh"

namespace trp {
namespace point_mask {
namespace {

struct Dims {
  int64_t total, num_points, channels, height, width, target_height, target_width;
};

// logits[q, p] and (when targets is set) the target value at the point, in opmath.
template <typename scalar_t, typename acc_t>
__global__ void sample_kernel(const scalar_t* embed, const scalar_t* features,
                              const int64_t* index, const scalar_t* points,
                              const scalar_t* targets, acc_t* logits, acc_t* target_values,
                              Dims d) {
  const int64_t pixels = d.height * d.width;
  TRP_GRID_STRIDE_LOOP(k, d.total) {
    const int64_t q = k / d.num_points;
    const acc_t x = static_cast<acc_t>(points[2 * k]);
    const acc_t y = static_cast<acc_t>(points[2 * k + 1]);
    const Corners<acc_t> c = corners<acc_t>(x, y, d.height, d.width);
    const scalar_t* f = features + index[q] * d.channels * pixels;
    const scalar_t* e = embed + q * d.channels;
    acc_t v = acc_t(0);
    for (int64_t ch = 0; ch < d.channels; ++ch) {
      v += static_cast<acc_t>(e[ch]) * sample(f + ch * pixels, c);
    }
    logits[k] = v;
    if (targets != nullptr) {
      const scalar_t* t = targets + q * d.target_height * d.target_width;
      target_values[k] = sample(t, corners<acc_t>(x, y, d.target_height, d.target_width));
    }
  }
}

// One block per query: its Sums over points; writes the two losses (losses != nullptr) or the
// four sums.
template <typename scalar_t, typename acc_t>
__global__ void reduce_kernel(const acc_t* logits, const acc_t* target_values, int64_t num_points,
                              scalar_t* losses_out, acc_t* sums_out) {
  const int64_t q = blockIdx.x;
  Sums<acc_t> s;
  for (int64_t p = threadIdx.x; p < num_points; p += blockDim.x) {
    s.add(logits[q * num_points + p], target_values[q * num_points + p]);
  }
  const Sums<acc_t> total = block_sums(s);
  if (threadIdx.x == 0) {
    if (losses_out != nullptr) {
      acc_t out[2];
      losses(total, num_points, out);
      losses_out[2 * q] = static_cast<scalar_t>(out[0]);
      losses_out[2 * q + 1] = static_cast<scalar_t>(out[1]);
    } else {
      sums_out[4 * q] = total.ce;
      sums_out[4 * q + 1] = total.prob;
      sums_out[4 * q + 2] = total.target;
      sums_out[4 * q + 3] = total.inter;
    }
  }
}

template <typename scalar_t, typename acc_t>
__global__ void dlogit_kernel(const acc_t* logits, const acc_t* target_values, const acc_t* sums,
                              const scalar_t* grad, acc_t* dl, int64_t total,
                              int64_t num_points) {
  TRP_GRID_STRIDE_LOOP(k, total) {
    const int64_t q = k / num_points;
    Sums<acc_t> s;
    s.ce = sums[4 * q];
    s.prob = sums[4 * q + 1];
    s.target = sums[4 * q + 2];
    s.inter = sums[4 * q + 3];
    dl[k] = dlogit(logits[k], target_values[k], s, num_points,
                   static_cast<acc_t>(grad[2 * q]), static_cast<acc_t>(grad[2 * q + 1]));
  }
}

// sampled[i, ch, p] = bilinear(features[image of query q0 + i, ch], point[q0 + i, p]).
template <typename scalar_t, typename acc_t>
__global__ void gather_kernel(const scalar_t* features, const int64_t* index,
                              const scalar_t* points, acc_t* sampled, int64_t q0,
                              int64_t num_queries, Dims d) {
  const int64_t pixels = d.height * d.width;
  TRP_GRID_STRIDE_LOOP(e, num_queries * d.channels * d.num_points) {
    const int64_t p = e % d.num_points;
    const int64_t ch = (e / d.num_points) % d.channels;
    const int64_t q = q0 + e / (d.num_points * d.channels);
    const int64_t k = q * d.num_points + p;
    const Corners<acc_t> c = corners<acc_t>(static_cast<acc_t>(points[2 * k]),
                                            static_cast<acc_t>(points[2 * k + 1]), d.height,
                                            d.width);
    sampled[e] = sample(features + (index[q] * d.channels + ch) * pixels, c);
  }
}

template <typename scalar_t, typename acc_t>
__global__ void scatter_kernel(const scalar_t* embed, const int64_t* index,
                               const scalar_t* points, const acc_t* dl, acc_t* grad_features,
                               Dims d) {
  const int64_t pixels = d.height * d.width;
  TRP_GRID_STRIDE_LOOP(k, d.total) {
    const acc_t g = dl[k];
    const int64_t q = k / d.num_points;
    const Corners<acc_t> c = corners<acc_t>(static_cast<acc_t>(points[2 * k]),
                                            static_cast<acc_t>(points[2 * k + 1]), d.height,
                                            d.width);
    const int64_t offset = index[q] * d.channels * pixels;
    for (int64_t ch = 0; ch < d.channels; ++ch) {
      const acc_t ge = g * static_cast<acc_t>(embed[q * d.channels + ch]);
      for (int j = 0; j < 4; ++j) {
        if (c.weight[j] != acc_t(0)) {
          atomicAdd(grad_features + offset + ch * pixels + c.index[j], ge * c.weight[j]);
        }
      }
    }
  }
}

struct Inputs {
  at::Tensor embed, features, index, points, targets;
  Dims d;
};

Inputs prepare(const at::Tensor& embed, const at::Tensor& features, const at::Tensor& index,
               const at::Tensor& points, const at::Tensor* targets) {
  Inputs in{embed.contiguous(), features.contiguous(), index.contiguous(), points.contiguous(),
            targets != nullptr ? targets->contiguous() : at::Tensor(), Dims{}};
  in.d = Dims{embed.size(0) * points.size(1), points.size(1), features.size(1), features.size(2),
              features.size(3), targets != nullptr ? targets->size(1) : 0,
              targets != nullptr ? targets->size(2) : 0};
  return in;
}

// Logits (and target values when in.targets is defined) in opmath, [Q, P].
std::pair<at::Tensor, at::Tensor> sample_points(const Inputs& in) {
  const auto acc = at::toOpMathType(in.embed.scalar_type());
  at::Tensor logits = at::empty({in.embed.size(0), in.d.num_points}, in.embed.options().dtype(acc));
  at::Tensor values = in.targets.defined() ? at::empty_like(logits) : at::Tensor();
  if (in.d.total == 0) {
    return {logits, values};
  }
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.embed.scalar_type(),
                                  "trp::point_mask_sample_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    sample_kernel<scalar_t, acc_t><<<grid_for(in.d.total), kThreads, 0, stream>>>(
        in.embed.const_data_ptr<scalar_t>(), in.features.const_data_ptr<scalar_t>(),
        in.index.const_data_ptr<int64_t>(), in.points.const_data_ptr<scalar_t>(),
        in.targets.defined() ? in.targets.const_data_ptr<scalar_t>() : nullptr,
        logits.mutable_data_ptr<acc_t>(),
        values.defined() ? values.mutable_data_ptr<acc_t>() : nullptr, in.d);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {logits, values};
}

// Sampled-feature elements per chunk of queries in the grad_embed GEMM (64 MiB of float).
constexpr int64_t kGatherElements = int64_t(1) << 24;

// grad_embed, grad_features from d loss / d logit [Q, P] (opmath).
std::tuple<at::Tensor, at::Tensor> scatter(const Inputs& in, const at::Tensor& dl) {
  const auto acc = at::toOpMathType(in.embed.scalar_type());
  at::Tensor grad_embed = at::zeros(in.embed.sizes(), in.embed.options().dtype(acc));
  at::Tensor grad_features = at::zeros(in.features.sizes(), in.features.options().dtype(acc));
  if (in.d.total > 0 && in.d.channels > 0) {
    at::globalContext().alertNotDeterministic("trp::point_mask CUDA backward (grad_features)");
    const int64_t queries = in.embed.size(0), per_query = in.d.channels * in.d.num_points;
    const int64_t chunk = std::max<int64_t>(1, std::min(queries, kGatherElements / per_query));
    at::Tensor sampled = at::empty({chunk * per_query}, dl.options());
    const auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.embed.scalar_type(),
                                    "trp::point_mask_scatter_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      for (int64_t q0 = 0; q0 < queries; q0 += chunk) {
        const int64_t nq = std::min(chunk, queries - q0);
        gather_kernel<scalar_t, acc_t><<<grid_for(nq * per_query), kThreads, 0, stream>>>(
            in.features.const_data_ptr<scalar_t>(), in.index.const_data_ptr<int64_t>(),
            in.points.const_data_ptr<scalar_t>(), sampled.mutable_data_ptr<acc_t>(), q0, nq,
            in.d);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        const at::Tensor s = sampled.narrow(0, 0, nq * per_query)
                                 .view({nq, in.d.channels, in.d.num_points});
        // [nq, C, P] x [nq, P, 1]: one GEMV per query, batched (cuBLAS, fixed summation order).
        grad_embed.narrow(0, q0, nq)
            .copy_(at::bmm(s, dl.narrow(0, q0, nq).unsqueeze(-1)).squeeze(-1));
      }
      scatter_kernel<scalar_t, acc_t><<<grid_for(in.d.total), kThreads, 0, stream>>>(
          in.embed.const_data_ptr<scalar_t>(), in.index.const_data_ptr<int64_t>(),
          in.points.const_data_ptr<scalar_t>(), dl.const_data_ptr<acc_t>(),
          grad_features.mutable_data_ptr<acc_t>(), in.d);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {grad_embed.to(in.embed.scalar_type()), grad_features.to(in.embed.scalar_type())};
}

at::Tensor point_mask_logits_cuda(const at::Tensor& mask_embed, const at::Tensor& pixel_features,
                                  const at::Tensor& image_index, const at::Tensor& points) {
  check_logits_inputs(mask_embed, pixel_features, image_index, points);
  const c10::cuda::CUDAGuard guard(mask_embed.device());
  const Inputs in = prepare(mask_embed, pixel_features, image_index, points, nullptr);
  return sample_points(in).first.to(mask_embed.scalar_type());
}

std::tuple<at::Tensor, at::Tensor> point_mask_logits_backward_cuda(
    const at::Tensor& grad, const at::Tensor& mask_embed, const at::Tensor& pixel_features,
    const at::Tensor& image_index, const at::Tensor& points) {
  check_logits_inputs(mask_embed, pixel_features, image_index, points);
  check_grad(grad, mask_embed, points.size(1), "[Q, P]");
  const c10::cuda::CUDAGuard guard(mask_embed.device());
  const Inputs in = prepare(mask_embed, pixel_features, image_index, points, nullptr);
  return scatter(in, grad.to(at::toOpMathType(mask_embed.scalar_type())).contiguous());
}

at::Tensor point_mask_loss_cuda(const at::Tensor& mask_embed, const at::Tensor& pixel_features,
                                const at::Tensor& image_index, const at::Tensor& target_masks,
                                const at::Tensor& points) {
  check_loss_inputs(mask_embed, pixel_features, image_index, target_masks, points);
  const c10::cuda::CUDAGuard guard(mask_embed.device());
  const Inputs in = prepare(mask_embed, pixel_features, image_index, points, &target_masks);
  at::Tensor out = at::empty({mask_embed.size(0), 2}, mask_embed.options());
  if (out.numel() == 0) {
    return out;
  }
  const auto [logits, values] = sample_points(in);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, mask_embed.scalar_type(),
                                  "trp::point_mask_loss_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    reduce_kernel<scalar_t, acc_t><<<mask_embed.size(0), kThreads, 0, stream>>>(
        logits.const_data_ptr<acc_t>(), values.const_data_ptr<acc_t>(), in.d.num_points,
        out.mutable_data_ptr<scalar_t>(), nullptr);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

std::tuple<at::Tensor, at::Tensor> point_mask_loss_backward_cuda(
    const at::Tensor& grad_in, const at::Tensor& mask_embed, const at::Tensor& pixel_features,
    const at::Tensor& image_index, const at::Tensor& target_masks, const at::Tensor& points) {
  check_loss_inputs(mask_embed, pixel_features, image_index, target_masks, points);
  check_grad(grad_in, mask_embed, 2, "[Q, 2]");
  const c10::cuda::CUDAGuard guard(mask_embed.device());
  const Inputs in = prepare(mask_embed, pixel_features, image_index, points, &target_masks);
  const at::Tensor grad = grad_in.contiguous();
  const auto [logits, values] = sample_points(in);
  at::Tensor dl = at::empty_like(logits);
  if (in.d.total > 0) {
    at::Tensor sums = at::empty({mask_embed.size(0), 4}, logits.options());
    const auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, mask_embed.scalar_type(),
                                    "trp::point_mask_loss_backward_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      reduce_kernel<scalar_t, acc_t><<<mask_embed.size(0), kThreads, 0, stream>>>(
          logits.const_data_ptr<acc_t>(), values.const_data_ptr<acc_t>(), in.d.num_points,
          nullptr, sums.mutable_data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      dlogit_kernel<scalar_t, acc_t><<<grid_for(in.d.total), kThreads, 0, stream>>>(
          logits.const_data_ptr<acc_t>(), values.const_data_ptr<acc_t>(),
          sums.const_data_ptr<acc_t>(), grad.const_data_ptr<scalar_t>(),
          dl.mutable_data_ptr<acc_t>(), in.d.total, in.d.num_points);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return scatter(in, dl);
}

}  // namespace
}  // namespace point_mask
}  // namespace trp

TORCH_LIBRARY_IMPL(trp, CUDA, m) {
  m.impl("point_mask_logits", &trp::point_mask::point_mask_logits_cuda);
  m.impl("point_mask_logits_backward", &trp::point_mask::point_mask_logits_backward_cuda);
  m.impl("point_mask_loss", &trp::point_mask::point_mask_loss_cuda);
  m.impl("point_mask_loss_backward", &trp::point_mask::point_mask_loss_backward_cuda);
}
