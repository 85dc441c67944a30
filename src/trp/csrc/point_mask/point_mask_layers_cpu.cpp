// CPU launcher of point_mask_loss_layers: Mask2Former's point losses of L decoder layers in one
// call, with d total / d inputs computed during the forward (the loss is a scalar, so the
// backward only scales the stored gradients; see trp/ops/point_mask_loss.py).
//
// Per image b, the (layer, query) rows of that image are processed a bounded chunk at a time:
//   M  = E_chunk . F_b                      (at::mm, [n, H * W], <= 8 MiB, never [L, Q, H, W])
//   per row (at::parallel_for, one task per row): generate the candidates from the seed, sample
//     their |logit| from M, keep the num_uncertain smallest (key, index) (std::nth_element),
//     add the uniform points, sample logits and targets at the points, the sums and the losses,
//     and scatter d total / d logit into the row's dM (race-free: the row is the task's own);
//   grad_embed rows = dM . F_b^T, grad_features[b] += E_chunk^T . dM   (BLAS-partitioned GEMMs).
// Three GEMMs per layer, as the eager path; the point sets are regenerated, never stored.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "point_mask/point_mask.h"
#include "cpu_capability.h"

namespace trp {
namespace point_mask {
namespace {

// Bound on the elements of one chunk's [n, H * W] logit map (8 MiB in fp32).
constexpr int64_t kLayerChunkElements = int64_t(1) << 21;

struct LayerProblem {
  int64_t layers, queries, channels, height, width, pixels, target_height, target_width;
  int64_t seed, num_points, num_uncertain, num_candidates;
};

// Per-task scratch, reused across the rows of a task.
template <typename T>
struct Scratch {
  std::vector<T> cx, cy, key, work;  // candidates
  std::vector<T> x, y, logit, prob, target;

  explicit Scratch(const LayerProblem& p)
      : cx(p.num_uncertain > 0 ? p.num_candidates : 0),
        cy(p.num_uncertain > 0 ? p.num_candidates : 0),
        key(p.num_uncertain > 0 ? p.num_candidates : 0),
        work(p.num_uncertain > 0 ? p.num_candidates : 0),
        x(p.num_points),
        y(p.num_points),
        logit(p.num_points),
        prob(p.num_points),
        target(p.num_points) {}
};

// The points of row (layer, query) into s.x / s.y: the num_uncertain candidates with the
// smallest (key, index), in index order, then the uniform points. The k-th smallest key v comes
// from std::nth_element on a copy of the keys; the kept set is every key < v plus the first
// (in index order) keys == v up to k, which is the (key, index) order without sorting indices.
template <typename T>
void row_points(const LayerProblem& p, int64_t layer, int64_t query, const T* map,
                Scratch<T>& s) {
  const int64_t k = p.num_uncertain;
  if (k > 0) {
    const uint32_t key = row_key(p.seed, kCandidateStream, layer, query);
    // Two simple loops (hash, then sampling) rather than one: the first one vectorises.
    for (int64_t i = 0; i < p.num_candidates; ++i) {
      s.cx[i] = uniform<T>(key, 2 * i);
      s.cy[i] = uniform<T>(key, 2 * i + 1);
    }
    for (int64_t i = 0; i < p.num_candidates; ++i) {
      s.key[i] = uncertainty_key(sample(map, corners<T>(s.cx[i], s.cy[i], p.height, p.width)));
    }
    std::copy(s.key.begin(), s.key.end(), s.work.begin());
    std::nth_element(s.work.begin(), s.work.begin() + (k - 1), s.work.end());
    const T v = s.work[k - 1];
    int64_t below = 0;
    for (int64_t i = 0; i < p.num_candidates; ++i) {
      below += s.key[i] < v;
    }
    int64_t ties = k - below;  // keys == v to keep, the first ones in index order
    int64_t j = 0;
    for (int64_t i = 0; i < p.num_candidates && j < k; ++i) {
      const T ki = s.key[i];
      if (ki < v || (ki == v && ties-- > 0)) {
        s.x[j] = s.cx[i];
        s.y[j] = s.cy[i];
        ++j;
      }
    }
  }
  const uint32_t key = row_key(p.seed, kUniformStream, layer, query);
  for (int64_t j = 0; j < p.num_points - k; ++j) {
    s.x[k + j] = uniform<T>(key, 2 * j);
    s.y[k + j] = uniform<T>(key, 2 * j + 1);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> point_mask_loss_layers_cpu(
    const at::Tensor& mask_embed, const at::Tensor& pixel_features, const at::Tensor& image_index,
    const at::Tensor& target_masks, int64_t seed, int64_t num_points, int64_t num_uncertain,
    int64_t num_candidates, double weight_mask, double weight_dice, double num_masks,
    bool compute_grad) {
  check_layers_inputs(mask_embed, pixel_features, image_index, target_masks, num_points,
                      num_uncertain, num_candidates, num_masks);
  const at::Tensor embed = mask_embed.contiguous();
  const at::Tensor features = pixel_features.contiguous();
  const at::Tensor index = image_index.contiguous();
  const at::Tensor targets = target_masks.contiguous();
  LayerProblem p{embed.size(0),   embed.size(1),    embed.size(2),      features.size(2),
                 features.size(3), features.size(2) * features.size(3), targets.size(1),
                 targets.size(2), seed,             num_points,         num_uncertain,
                 num_candidates};
  const int64_t num_images = features.size(0);
  const int64_t rows_total = p.layers * p.queries;
  // Unweighted per-row losses (mean sigmoid-CE, dice), reduced per layer at the end so that the
  // result does not depend on the thread count.
  at::Tensor per_row = at::zeros({p.layers, p.queries, 2}, embed.options());
  at::Tensor grad_embed = compute_grad ? at::zeros_like(embed) : at::empty({0}, embed.options());
  at::Tensor grad_features =
      compute_grad ? at::zeros_like(features) : at::empty({0}, features.options());
  if (rows_total > 0) {
    // Rows (layer * Q + query) of each image, layer-major.
    std::vector<std::vector<int64_t>> rows_of(num_images);
    const int64_t* idx = index.const_data_ptr<int64_t>();
    for (int64_t l = 0; l < p.layers; ++l) {
      for (int64_t q = 0; q < p.queries; ++q) {
        rows_of[idx[q]].push_back(l * p.queries + q);
      }
    }
    const int64_t step = std::max<int64_t>(
        1, std::min<int64_t>(256, kLayerChunkElements / std::max<int64_t>(p.pixels, 1)));
    const at::Tensor embed_rows = embed.view({rows_total, p.channels});
    const at::Tensor grad_embed_rows =
        compute_grad ? grad_embed.view({rows_total, p.channels}) : grad_embed;
    AT_DISPATCH_FLOATING_TYPES(embed.scalar_type(), "trp::point_mask_loss_layers_cpu", [&] {
      using T = scalar_t;
      const T* tgt = targets.const_data_ptr<T>();
      T* losses_out = per_row.mutable_data_ptr<T>();
      const T grad_ce = static_cast<T>(weight_mask / num_masks);
      const T grad_dice = static_cast<T>(weight_dice / num_masks);
      const int64_t target_pixels = p.target_height * p.target_width;
      for (int64_t b = 0; b < num_images; ++b) {
        const std::vector<int64_t>& rows = rows_of[b];
        const at::Tensor image = features[b].view({p.channels, p.pixels});  // C x HW
        for (size_t lo = 0; lo < rows.size(); lo += static_cast<size_t>(step)) {
          const size_t hi = std::min(rows.size(), lo + static_cast<size_t>(step));
          const at::Tensor chunk_rows = at::tensor(
              std::vector<int64_t>(rows.begin() + lo, rows.begin() + hi), index.options());
          const at::Tensor e = embed_rows.index_select(0, chunk_rows);  // n x C
          const at::Tensor m = at::mm(e, image);                         // n x HW
          at::Tensor dm = compute_grad ? at::zeros_like(m) : at::Tensor();
          const int64_t* r = chunk_rows.const_data_ptr<int64_t>();
          const T* maps = m.const_data_ptr<T>();
          T* dmaps = compute_grad ? dm.mutable_data_ptr<T>() : nullptr;
          at::parallel_for(0, chunk_rows.numel(), 1, [&](int64_t begin, int64_t end) {
            Scratch<T> s(p);
            for (int64_t i = begin; i < end; ++i) {
              const int64_t layer = r[i] / p.queries, query = r[i] % p.queries;
              const T* map = maps + i * p.pixels;
              const T* target = tgt + query * target_pixels;
              row_points(p, layer, query, map, s);
              Sums<T> sums;
              for (int64_t j = 0; j < p.num_points; ++j) {
                s.logit[j] = sample(map, corners<T>(s.x[j], s.y[j], p.height, p.width));
                s.target[j] = sample(
                    target, corners<T>(s.x[j], s.y[j], p.target_height, p.target_width));
                s.prob[j] = sums.add(s.logit[j], s.target[j]);
              }
              losses(sums, p.num_points, losses_out + r[i] * 2);
              if (dmaps != nullptr) {
                T* drow = dmaps + i * p.pixels;
                const DlogitCoeffs<T> dl(sums, p.num_points, grad_ce, grad_dice);
                for (int64_t j = 0; j < p.num_points; ++j) {
                  const T g = dl(s.prob[j], s.target[j]);
                  const auto c = corners<T>(s.x[j], s.y[j], p.height, p.width);
                  for (int k = 0; k < 4; ++k) {
                    drow[c.index[k]] += c.weight[k] * g;
                  }
                }
              }
            }
          });
          if (compute_grad) {
            grad_embed_rows.index_copy_(0, chunk_rows, at::mm(dm, image.t()));
            grad_features[b].view({p.channels, p.pixels}).addmm_(e.t(), dm);
          }
        }
      }
    });
  }
  const at::Tensor per_layer = per_row.sum(1).div_(num_masks);  // L x 2
  const at::Tensor total =
      (per_layer.select(1, 0) * weight_mask + per_layer.select(1, 1) * weight_dice).sum();
  return {total, per_layer, grad_embed, grad_features};
}

}  // namespace
}  // namespace point_mask
}  // namespace trp

TRP_CPU_KERNELS(point_mask_layers, m) {
  m.impl("point_mask_loss_layers", &trp::point_mask::point_mask_loss_layers_cpu);
}
