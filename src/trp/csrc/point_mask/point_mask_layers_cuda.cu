// CUDA launcher of point_mask_loss_layers, mirroring the CPU launcher chunk for chunk: per image,
// a bounded chunk of (layer, query) rows at a time,
//   M = E_chunk . F_b (at::mm), candidate keys (one thread per candidate, shared hash and
//   bilinear math), selection by a stable at::sort of the keys (ties -> smaller index, as the CPU
//   comparator), logits and targets at the points (one thread per point), the per-row sums (one
//   block per row), d total / d logit scattered into dM (one thread per point), then
//   grad_embed rows = dM . F_b^T and grad_features[b] += E_chunk^T . dM (at::mm / addmm_).
// The scatter into dM uses atomicAdd: points of one row share pixels, and the CPU's race-free
// partition (one task per row) would leave a GPU with only n threads. Scratch is in opmath (float
// for half/bfloat16) and cast to the input dtype for the GEMMs.
#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "cuda_launch.cuh"
#include "point_mask/point_mask.h"
#include "point_mask/point_mask_reduce.cuh"

namespace trp {
namespace point_mask {
namespace {

constexpr int64_t kLayerChunkElements = int64_t(1) << 21;

struct LayerDims {
  int64_t rows;  // rows in the chunk
  int64_t queries, pixels, height, width, target_height, target_width;
  int64_t seed, num_points, num_uncertain, num_candidates;
};

// Point j of chunk row i (layer, query): a kept candidate (chosen [rows, num_uncertain]) or a
// uniform point, from the same hash as the CPU launcher.
template <typename acc_t>
__device__ inline void point_xy(const LayerDims& d, const int64_t* chosen, int64_t i, int64_t j,
                                int64_t layer, int64_t query, acc_t& x, acc_t& y) {
  if (j < d.num_uncertain) {
    const uint32_t key = row_key(d.seed, kCandidateStream, layer, query);
    const int64_t c = chosen[i * d.num_uncertain + j];
    x = uniform<acc_t>(key, 2 * c);
    y = uniform<acc_t>(key, 2 * c + 1);
  } else {
    const uint32_t key = row_key(d.seed, kUniformStream, layer, query);
    const int64_t u = j - d.num_uncertain;
    x = uniform<acc_t>(key, 2 * u);
    y = uniform<acc_t>(key, 2 * u + 1);
  }
}

template <typename scalar_t, typename acc_t>
__global__ void candidate_kernel(const scalar_t* maps, const int64_t* rows, acc_t* keys,
                                 LayerDims d) {
  TRP_GRID_STRIDE_LOOP(k, d.rows * d.num_candidates) {
    const int64_t i = k / d.num_candidates, c = k % d.num_candidates;
    const int64_t row = rows[i];
    const uint32_t key = row_key(d.seed, kCandidateStream, row / d.queries, row % d.queries);
    const acc_t x = uniform<acc_t>(key, 2 * c), y = uniform<acc_t>(key, 2 * c + 1);
    keys[k] = uncertainty_key(
        sample(maps + i * d.pixels, corners<acc_t>(x, y, d.height, d.width)));
  }
}

template <typename scalar_t, typename acc_t>
__global__ void point_kernel(const scalar_t* maps, const scalar_t* targets, const int64_t* rows,
                             const int64_t* chosen, acc_t* logits, acc_t* target_values,
                             LayerDims d) {
  TRP_GRID_STRIDE_LOOP(k, d.rows * d.num_points) {
    const int64_t i = k / d.num_points, j = k % d.num_points;
    const int64_t row = rows[i], layer = row / d.queries, query = row % d.queries;
    acc_t x, y;
    point_xy(d, chosen, i, j, layer, query, x, y);
    logits[k] = sample(maps + i * d.pixels, corners<acc_t>(x, y, d.height, d.width));
    target_values[k] = sample(targets + query * d.target_height * d.target_width,
                              corners<acc_t>(x, y, d.target_height, d.target_width));
  }
}

// One block per chunk row: its Sums (into sums [rows, 4]) and losses (into per_row [L * Q, 2]).
template <typename acc_t>
__global__ void row_reduce_kernel(const acc_t* logits, const acc_t* target_values,
                                  const int64_t* rows, acc_t* sums, acc_t* per_row,
                                  int64_t num_points) {
  const int64_t i = blockIdx.x;
  Sums<acc_t> s;
  for (int64_t j = threadIdx.x; j < num_points; j += blockDim.x) {
    s.add(logits[i * num_points + j], target_values[i * num_points + j]);
  }
  const Sums<acc_t> total = block_sums(s);
  if (threadIdx.x == 0) {
    sums[4 * i] = total.ce;
    sums[4 * i + 1] = total.prob;
    sums[4 * i + 2] = total.target;
    sums[4 * i + 3] = total.inter;
    losses(total, num_points, per_row + 2 * rows[i]);
  }
}

template <typename acc_t>
__global__ void scatter_kernel(const acc_t* logits, const acc_t* target_values,
                               const acc_t* sums, const int64_t* rows, const int64_t* chosen,
                               acc_t* dm, acc_t grad_ce, acc_t grad_dice, LayerDims d) {
  TRP_GRID_STRIDE_LOOP(k, d.rows * d.num_points) {
    const int64_t i = k / d.num_points, j = k % d.num_points;
    const int64_t row = rows[i], layer = row / d.queries, query = row % d.queries;
    Sums<acc_t> s;
    s.ce = sums[4 * i];
    s.prob = sums[4 * i + 1];
    s.target = sums[4 * i + 2];
    s.inter = sums[4 * i + 3];
    const acc_t g = dlogit(logits[k], target_values[k], s, d.num_points, grad_ce, grad_dice);
    acc_t x, y;
    point_xy(d, chosen, i, j, layer, query, x, y);
    const Corners<acc_t> c = corners<acc_t>(x, y, d.height, d.width);
    for (int q = 0; q < 4; ++q) {
      if (c.weight[q] != acc_t(0)) {
        atomicAdd(dm + i * d.pixels + c.index[q], c.weight[q] * g);
      }
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> point_mask_loss_layers_cuda(
    const at::Tensor& mask_embed, const at::Tensor& pixel_features, const at::Tensor& image_index,
    const at::Tensor& target_masks, int64_t seed, int64_t num_points, int64_t num_uncertain,
    int64_t num_candidates, double weight_mask, double weight_dice, double num_masks,
    bool compute_grad) {
  check_layers_inputs(mask_embed, pixel_features, image_index, target_masks, num_points,
                      num_uncertain, num_candidates, num_masks);
  const c10::cuda::CUDAGuard guard(mask_embed.device());
  if (compute_grad) {
    // dM is summed with float atomics (points of one row share pixels).
    at::globalContext().alertNotDeterministic("trp::point_mask_loss_layers CUDA backward");
  }
  const at::Tensor embed = mask_embed.contiguous();
  const at::Tensor features = pixel_features.contiguous();
  const at::Tensor targets = target_masks.contiguous();
  const int64_t layers = embed.size(0), queries = embed.size(1), channels = embed.size(2);
  const int64_t num_images = features.size(0), pixels = features.size(2) * features.size(3);
  const int64_t rows_total = layers * queries;
  const auto acc_type = at::toOpMathType(embed.scalar_type());
  at::Tensor per_row = at::zeros({rows_total, 2}, embed.options().dtype(acc_type));
  at::Tensor grad_embed = compute_grad ? at::zeros_like(embed) : at::empty({0}, embed.options());
  at::Tensor grad_features =
      compute_grad ? at::zeros_like(features) : at::empty({0}, features.options());
  if (rows_total > 0) {
    // Rows (layer * Q + query) of each image, layer-major, built on the host.
    const at::Tensor host_index = image_index.to(at::kCPU).contiguous();
    const int64_t* idx = host_index.const_data_ptr<int64_t>();
    std::vector<std::vector<int64_t>> rows_of(num_images);
    for (int64_t l = 0; l < layers; ++l) {
      for (int64_t q = 0; q < queries; ++q) {
        rows_of[idx[q]].push_back(l * queries + q);
      }
    }
    const int64_t step =
        std::max<int64_t>(1, std::min<int64_t>(256, kLayerChunkElements / pixels));
    const at::Tensor embed_rows = embed.view({rows_total, channels});
    const at::Tensor grad_embed_rows =
        compute_grad ? grad_embed.view({rows_total, channels}) : grad_embed;
    const auto stream = c10::cuda::getCurrentCUDAStream();
    for (int64_t b = 0; b < num_images; ++b) {
      const std::vector<int64_t>& rows = rows_of[b];
      const at::Tensor image = features[b].view({channels, pixels});
      for (size_t lo = 0; lo < rows.size(); lo += static_cast<size_t>(step)) {
        const size_t hi = std::min(rows.size(), lo + static_cast<size_t>(step));
        const at::Tensor chunk_rows =
            at::tensor(std::vector<int64_t>(rows.begin() + lo, rows.begin() + hi), at::kLong)
                .to(embed.device());
        const int64_t n = chunk_rows.numel();
        const at::Tensor e = embed_rows.index_select(0, chunk_rows);  // n x C
        const at::Tensor m = at::mm(e, image);                         // n x HW
        LayerDims d{n,           queries,         pixels,    features.size(2),
                    features.size(3), targets.size(1), targets.size(2), seed,
                    num_points,  num_uncertain,   num_candidates};
        at::Tensor chosen = at::empty({n, 0}, chunk_rows.options());
        if (num_uncertain > 0) {
          at::Tensor keys = at::empty({n, num_candidates}, embed.options().dtype(acc_type));
          AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, embed.scalar_type(),
                                          "trp::point_mask_layers_candidates_cuda", [&] {
            using acc_t = at::opmath_type<scalar_t>;
            candidate_kernel<scalar_t, acc_t><<<grid_for(n * num_candidates), kThreads, 0,
                                                stream>>>(
                m.const_data_ptr<scalar_t>(), chunk_rows.const_data_ptr<int64_t>(),
                keys.mutable_data_ptr<acc_t>(), d);
          });
          C10_CUDA_KERNEL_LAUNCH_CHECK();
          // Stable sort: equal keys keep index order, so the kept set is the CPU's.
          const at::Tensor order =
              std::get<1>(at::sort(keys, /*stable=*/true, /*dim=*/1, /*descending=*/false));
          chosen = std::get<0>(at::sort(order.narrow(1, 0, num_uncertain), /*dim=*/1))
                       .contiguous();
        }
        at::Tensor logits = at::empty({n, num_points}, embed.options().dtype(acc_type));
        at::Tensor values = at::empty_like(logits);
        at::Tensor sums = at::empty({n, 4}, logits.options());
        at::Tensor dm = compute_grad ? at::zeros({n, pixels}, logits.options()) : at::Tensor();
        AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, embed.scalar_type(),
                                        "trp::point_mask_layers_points_cuda", [&] {
          using acc_t = at::opmath_type<scalar_t>;
          point_kernel<scalar_t, acc_t><<<grid_for(n * num_points), kThreads, 0, stream>>>(
              m.const_data_ptr<scalar_t>(), targets.const_data_ptr<scalar_t>(),
              chunk_rows.const_data_ptr<int64_t>(), chosen.const_data_ptr<int64_t>(),
              logits.mutable_data_ptr<acc_t>(), values.mutable_data_ptr<acc_t>(), d);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
          row_reduce_kernel<acc_t><<<static_cast<unsigned int>(n), kThreads, 0, stream>>>(
              logits.const_data_ptr<acc_t>(), values.const_data_ptr<acc_t>(),
              chunk_rows.const_data_ptr<int64_t>(), sums.mutable_data_ptr<acc_t>(),
              per_row.mutable_data_ptr<acc_t>(), num_points);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
          if (compute_grad) {
            scatter_kernel<acc_t><<<grid_for(n * num_points), kThreads, 0, stream>>>(
                logits.const_data_ptr<acc_t>(), values.const_data_ptr<acc_t>(),
                sums.const_data_ptr<acc_t>(), chunk_rows.const_data_ptr<int64_t>(),
                chosen.const_data_ptr<int64_t>(), dm.mutable_data_ptr<acc_t>(),
                static_cast<acc_t>(weight_mask / num_masks),
                static_cast<acc_t>(weight_dice / num_masks), d);
            C10_CUDA_KERNEL_LAUNCH_CHECK();
          }
        });
        if (compute_grad) {
          const at::Tensor dm_s = dm.to(embed.scalar_type());
          grad_embed_rows.index_copy_(0, chunk_rows, at::mm(dm_s, image.t()));
          grad_features[b].view({channels, pixels}).addmm_(e.t(), dm_s);
        }
      }
    }
  }
  const at::Tensor per_layer = per_row.view({layers, queries, 2}).sum(1).div_(num_masks);
  const at::Tensor total =
      (per_layer.select(1, 0) * weight_mask + per_layer.select(1, 1) * weight_dice).sum();
  return {total.to(embed.scalar_type()), per_layer.to(embed.scalar_type()), grad_embed,
          grad_features};
}

}  // namespace
}  // namespace point_mask
}  // namespace trp

TORCH_LIBRARY_IMPL(trp, CUDA, m) {
  m.impl("point_mask_loss_layers", &trp::point_mask::point_mask_loss_layers_cuda);
}
