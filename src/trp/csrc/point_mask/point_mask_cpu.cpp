// CPU launcher of point_mask_logits / point_mask_loss and their backward ops.
//
// On a CPU the projection embed[q] . features[b][:, pixel] is a dense GEMM: with P = 12544
// points the 4 bilinear corners touch most of an H x W = 256 x 256 map anyway, so each query's
// logit map is computed for a small chunk of queries at a time ([chunk, H * W], never [Q, H, W])
// with at::mm, then sampled per point with the shared math of point_mask.h. The backward
// scatters d logit into a per-query [H * W] row (race-free: one task per query) and turns it into
// grad_embed = dM . F^T and grad_features[b] += E^T . dM, GEMMs partitioned over (channel,
// pixel) tiles of image b by BLAS, so no two tasks write the same gradient element.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "point_mask/point_mask.h"
#include "cpu_capability.h"

namespace trp {
namespace point_mask {
namespace {

// Bound on the elements of one chunk's [chunk, H * W] logit map (8 MiB in fp32).
constexpr int64_t kChunkElements = int64_t(1) << 21;

// Queries of each image, in query order.
std::vector<std::vector<int64_t>> queries_per_image(const at::Tensor& image_index,
                                                    int64_t num_images) {
  std::vector<std::vector<int64_t>> out(num_images);
  const int64_t* idx = image_index.const_data_ptr<int64_t>();
  for (int64_t q = 0; q < image_index.numel(); ++q) {
    out[idx[q]].push_back(q);
  }
  return out;
}

struct Problem {
  at::Tensor embed, features, index, points;
  int64_t num_images, channels, height, width, pixels, num_points;
  std::vector<std::vector<int64_t>> per_image;

  Problem(const at::Tensor& embed_in, const at::Tensor& features_in,
          const at::Tensor& index_in, const at::Tensor& points_in)
      : embed(embed_in.contiguous()),
        features(features_in.contiguous()),
        index(index_in.contiguous()),
        points(points_in.contiguous()),
        num_images(features.size(0)),
        channels(features.size(1)),
        height(features.size(2)),
        width(features.size(3)),
        pixels(height * width),
        num_points(points.size(1)),
        per_image(queries_per_image(index, num_images)) {}

  int64_t chunk() const {
    return std::max<int64_t>(1, std::min<int64_t>(256, kChunkElements / std::max<int64_t>(pixels, 1)));
  }

  // Calls fn(b, rows, E [n, C], M [n, H * W]) for every chunk of queries of every image, where
  // rows holds the n query indices and M their logit maps.
  template <typename Fn>
  void for_each_chunk(Fn fn) const {
    const int64_t step = chunk();
    for (int64_t b = 0; b < num_images; ++b) {
      const std::vector<int64_t>& queries = per_image[b];
      const at::Tensor image = features[b].view({channels, pixels});  // C x HW
      for (size_t lo = 0; lo < queries.size(); lo += step) {
        const size_t hi = std::min(queries.size(), lo + static_cast<size_t>(step));
        const at::Tensor rows =
            at::tensor(std::vector<int64_t>(queries.begin() + lo, queries.begin() + hi),
                       index.options());
        const at::Tensor e = embed.index_select(0, rows);  // n x C
        fn(b, rows, e, at::mm(e, image));                  // n x HW
      }
    }
  }
};

at::Tensor point_mask_logits_cpu(const at::Tensor& mask_embed, const at::Tensor& pixel_features,
                                 const at::Tensor& image_index, const at::Tensor& points_in) {
  check_logits_inputs(mask_embed, pixel_features, image_index, points_in);
  const Problem pr(mask_embed, pixel_features, image_index, points_in);
  at::Tensor out = at::empty({mask_embed.size(0), pr.num_points}, mask_embed.options());
  if (out.numel() == 0) {
    return out;
  }
  AT_DISPATCH_FLOATING_TYPES(mask_embed.scalar_type(), "trp::point_mask_logits_cpu", [&] {
    const scalar_t* pts = pr.points.const_data_ptr<scalar_t>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    const int64_t np = pr.num_points;
    pr.for_each_chunk([&](int64_t, const at::Tensor& rows, const at::Tensor&, const at::Tensor& m) {
      const int64_t* r = rows.const_data_ptr<int64_t>();
      const scalar_t* maps = m.const_data_ptr<scalar_t>();
      at::parallel_for(0, rows.numel(), 1, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          const int64_t q = r[i];
          const scalar_t* xy = pts + q * np * 2;
          for (int64_t p = 0; p < np; ++p) {
            const auto c = corners<scalar_t>(xy[2 * p], xy[2 * p + 1], pr.height, pr.width);
            o[q * np + p] = sample(maps + i * pr.pixels, c);
          }
        }
      });
    });
  });
  return out;
}

at::Tensor point_mask_loss_cpu(const at::Tensor& mask_embed, const at::Tensor& pixel_features,
                               const at::Tensor& image_index, const at::Tensor& target_masks_in,
                               const at::Tensor& points_in) {
  check_loss_inputs(mask_embed, pixel_features, image_index, target_masks_in, points_in);
  const Problem pr(mask_embed, pixel_features, image_index, points_in);
  const at::Tensor targets = target_masks_in.contiguous();
  at::Tensor out = at::empty({mask_embed.size(0), 2}, mask_embed.options());
  if (out.numel() == 0) {
    return out;
  }
  const int64_t th = targets.size(1), tw = targets.size(2);
  AT_DISPATCH_FLOATING_TYPES(mask_embed.scalar_type(), "trp::point_mask_loss_cpu", [&] {
    const scalar_t* pts = pr.points.const_data_ptr<scalar_t>();
    const scalar_t* tgt = targets.const_data_ptr<scalar_t>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    const int64_t np = pr.num_points;
    pr.for_each_chunk([&](int64_t, const at::Tensor& rows, const at::Tensor&, const at::Tensor& m) {
      const int64_t* r = rows.const_data_ptr<int64_t>();
      const scalar_t* maps = m.const_data_ptr<scalar_t>();
      at::parallel_for(0, rows.numel(), 1, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          const int64_t q = r[i];
          Sums<scalar_t> s;
          for (int64_t p = 0; p < np; ++p) {
            const scalar_t* xy = pts + (q * np + p) * 2;
            const scalar_t logit =
                sample(maps + i * pr.pixels, corners<scalar_t>(xy[0], xy[1], pr.height, pr.width));
            s.add(logit, sample(tgt + q * th * tw, corners<scalar_t>(xy[0], xy[1], th, tw)));
          }
          losses(s, np, o + q * 2);
        }
      });
    });
  });
  return out;
}

// Shared by both backward ops: fill(i, q, m_row, dm_row) writes d loss / d M for query q (the
// i-th of the chunk, whose logit map is m_row) into the zeroed row dm_row; then two GEMMs.
template <typename scalar_t, typename Fill>
std::tuple<at::Tensor, at::Tensor> backward_cpu(const Problem& pr, Fill fill) {
  at::Tensor grad_embed = at::zeros_like(pr.embed);
  at::Tensor grad_features = at::zeros_like(pr.features);
  pr.for_each_chunk([&](int64_t b, const at::Tensor& rows, const at::Tensor& e,
                        const at::Tensor& m) {
    at::Tensor dm = at::zeros_like(m);  // n x HW
    const int64_t* r = rows.const_data_ptr<int64_t>();
    const scalar_t* maps = m.const_data_ptr<scalar_t>();
    scalar_t* dmaps = dm.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, rows.numel(), 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        fill(r[i], maps + i * pr.pixels, dmaps + i * pr.pixels);
      }
    });
    const at::Tensor image = pr.features[b].view({pr.channels, pr.pixels});
    grad_embed.index_copy_(0, rows, at::mm(dm, image.t()));
    grad_features[b].view({pr.channels, pr.pixels}).addmm_(e.t(), dm);
  });
  return {grad_embed, grad_features};
}

template <typename T>
void scatter(T* row, const Corners<T>& c, T g) {
  for (int k = 0; k < 4; ++k) {
    row[c.index[k]] += c.weight[k] * g;
  }
}

std::tuple<at::Tensor, at::Tensor> point_mask_logits_backward_cpu(
    const at::Tensor& grad_in, const at::Tensor& mask_embed, const at::Tensor& pixel_features,
    const at::Tensor& image_index, const at::Tensor& points_in) {
  check_logits_inputs(mask_embed, pixel_features, image_index, points_in);
  check_grad(grad_in, mask_embed, points_in.size(1), "[Q, P]");
  const Problem pr(mask_embed, pixel_features, image_index, points_in);
  const at::Tensor grad = grad_in.contiguous();
  std::tuple<at::Tensor, at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES(mask_embed.scalar_type(), "trp::point_mask_logits_backward_cpu", [&] {
    const scalar_t* pts = pr.points.const_data_ptr<scalar_t>();
    const scalar_t* g = grad.const_data_ptr<scalar_t>();
    const int64_t np = pr.num_points;
    out = backward_cpu<scalar_t>(pr, [&](int64_t q, const scalar_t*, scalar_t* dm) {
      for (int64_t p = 0; p < np; ++p) {
        const scalar_t* xy = pts + (q * np + p) * 2;
        scatter(dm, corners<scalar_t>(xy[0], xy[1], pr.height, pr.width), g[q * np + p]);
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> point_mask_loss_backward_cpu(
    const at::Tensor& grad_in, const at::Tensor& mask_embed, const at::Tensor& pixel_features,
    const at::Tensor& image_index, const at::Tensor& target_masks_in, const at::Tensor& points_in) {
  check_loss_inputs(mask_embed, pixel_features, image_index, target_masks_in, points_in);
  check_grad(grad_in, mask_embed, 2, "[Q, 2]");
  const Problem pr(mask_embed, pixel_features, image_index, points_in);
  const at::Tensor grad = grad_in.contiguous();
  const at::Tensor targets = target_masks_in.contiguous();
  const int64_t th = targets.size(1), tw = targets.size(2);
  std::tuple<at::Tensor, at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES(mask_embed.scalar_type(), "trp::point_mask_loss_backward_cpu", [&] {
    const scalar_t* pts = pr.points.const_data_ptr<scalar_t>();
    const scalar_t* tgt = targets.const_data_ptr<scalar_t>();
    const scalar_t* g = grad.const_data_ptr<scalar_t>();
    const int64_t np = pr.num_points;
    out = backward_cpu<scalar_t>(pr, [&](int64_t q, const scalar_t* m, scalar_t* dm) {
      const scalar_t* qp = pts + q * np * 2;
      const scalar_t* qt = tgt + q * th * tw;
      // The sums need every point before any d logit: keep the sampled (logit, target) pairs
      // of this query for the second pass instead of sampling both maps again.
      std::vector<scalar_t> sampled(2 * np);
      Sums<scalar_t> s;
      for (int64_t p = 0; p < np; ++p) {
        const scalar_t x = qp[2 * p], y = qp[2 * p + 1];
        sampled[2 * p] = sample(m, corners<scalar_t>(x, y, pr.height, pr.width));
        sampled[2 * p + 1] = sample(qt, corners<scalar_t>(x, y, th, tw));
        s.add(sampled[2 * p], sampled[2 * p + 1]);
      }
      for (int64_t p = 0; p < np; ++p) {
        const auto c = corners<scalar_t>(qp[2 * p], qp[2 * p + 1], pr.height, pr.width);
        scatter(dm, c, dlogit(sampled[2 * p], sampled[2 * p + 1], s, np, g[q * 2], g[q * 2 + 1]));
      }
    });
  });
  return out;
}

}  // namespace
}  // namespace point_mask
}  // namespace trp

TRP_CPU_KERNELS(point_mask, m) {
  m.impl("point_mask_logits", &trp::point_mask::point_mask_logits_cpu);
  m.impl("point_mask_logits_backward", &trp::point_mask::point_mask_logits_backward_cpu);
  m.impl("point_mask_loss", &trp::point_mask::point_mask_loss_cpu);
  m.impl("point_mask_loss_backward", &trp::point_mask::point_mask_loss_backward_cpu);
}
