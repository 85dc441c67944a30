// Helpers shared by every op: precondition checks (host) and small math (host + device).
#pragma once

#include <ATen/ATen.h>
#include <c10/macros/Macros.h>

// The CPU kernels are compiled once per instruction set (setup.py: DEFAULT, AVX2, AVX512; see
// cpu_capability.h), so every inline function of trp's headers gets one copy per instruction set.
// They live in an inline namespace named after it, as ATen's kernels do with CPU_CAPABILITY:
// without it the linker would keep one arbitrary copy of each, and an AVX-512 copy called from the
// DEFAULT kernels is an illegal instruction on an older CPU. Each op's namespace is declared here
// first, so that the headers' plain `namespace trp { namespace <op> {` extends the one inside
// (C++ [namespace.def]): a new op adds its namespace to this list.
#ifndef TRP_CPU_CAPABILITY
#define TRP_CPU_CAPABILITY DEFAULT
#endif

namespace trp {
inline namespace TRP_CPU_CAPABILITY {
namespace box_iou {}
namespace match_cost {}
namespace ms_deform_attn {}
namespace oks {}
namespace point_mask {}
namespace soft_argmax {}
namespace vrt_ce {}
}  // namespace TRP_CPU_CAPABILITY
}  // namespace trp

namespace trp {
inline namespace TRP_CPU_CAPABILITY {

// Every public op validates its inputs with these before touching data, so a bad call raises
// a Python exception instead of reading out of bounds.
inline void check_floating(const at::Tensor& t, const char* name) {
  TORCH_CHECK_TYPE(at::isFloatingType(t.scalar_type()), name,
                   " must be a floating-point tensor, got ", t.scalar_type());
}

inline void check_dtype(const at::Tensor& t, at::ScalarType dtype, const char* name) {
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, name, " must have dtype ", dtype, ", got ",
                   t.scalar_type());
}

inline void check_dim(const at::Tensor& t, int64_t dim, const char* name) {
  TORCH_CHECK_VALUE(t.dim() == dim, name, " must be ", dim, "-D, got shape ", t.sizes());
}

inline void check_same_device(const at::Tensor& a, const at::Tensor& b, const char* name_a,
                              const char* name_b) {
  TORCH_CHECK(a.device() == b.device(), name_a, " and ", name_b,
              " must be on the same device, got ", a.device(), " and ", b.device());
}

inline void check_same_dtype(const at::Tensor& a, const at::Tensor& b, const char* name_a,
                             const char* name_b) {
  TORCH_CHECK_TYPE(a.scalar_type() == b.scalar_type(), name_a, " and ", name_b,
                   " must have the same dtype, got ", a.scalar_type(), " and ", b.scalar_type());
}

inline void check_boxes(const at::Tensor& boxes, const char* name) {
  check_floating(boxes, name);
  TORCH_CHECK_VALUE(boxes.dim() == 2 && boxes.size(1) == 4, name,
                    " must have shape [N, 4], got ", boxes.sizes());
}

// Offsets [B + 1] splitting a flat dimension of size `total` into B contiguous blocks.
inline void check_offsets(const at::Tensor& offsets, int64_t num_blocks, int64_t total,
                          const char* name) {
  check_dtype(offsets, at::kLong, name);
  TORCH_CHECK_VALUE(offsets.dim() == 1 && offsets.size(0) == num_blocks + 1, name,
                    " must have shape [", num_blocks + 1, "], got ", offsets.sizes());
  const at::Tensor host = offsets.to(at::kCPU).contiguous();
  const int64_t* o = host.data_ptr<int64_t>();
  TORCH_CHECK_VALUE(o[0] == 0, name, "[0] must be 0, got ", o[0]);
  for (int64_t b = 0; b < num_blocks; ++b) {
    TORCH_CHECK_VALUE(o[b + 1] >= o[b], name, " must be non-decreasing, got ", o[b], " then ",
                      o[b + 1], " at index ", b);
  }
  TORCH_CHECK_VALUE(o[num_blocks] == total, name, "[-1] must equal ", total, ", got ",
                    o[num_blocks]);
}

// Index of the block b with offsets[b] * scale <= i < offsets[b + 1] * scale (binary search;
// empty blocks are skipped because their range is empty).
C10_HOST_DEVICE inline int64_t find_block(const int64_t* offsets, int64_t num_blocks, int64_t scale,
                                          int64_t i) {
  int64_t lo = 0;
  int64_t hi = num_blocks - 1;
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) / 2;
    if (offsets[mid] * scale <= i) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

template <typename T>
C10_HOST_DEVICE inline T safe_div(T num, T den) {
  // 0/0 cases (two zero-area boxes) are defined as 0 rather than NaN: a NaN in a matching cost
  // breaks linear_sum_assignment and a NaN loss poisons training.
  return den > T(0) ? num / den : T(0);
}

}  // namespace TRP_CPU_CAPABILITY
}  // namespace trp
