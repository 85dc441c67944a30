// Launch helpers for the thin CUDA launchers: a grid-stride loop over a flat index space.
#pragma once

#include <algorithm>
#include <cstdint>

// c10 headers only: ATen/cuda/CUDAContext.h pulls in cuSPARSE/cuBLAS headers that a minimal
// CUDA toolkit (nvcc + runtime) does not ship.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#define TRP_GRID_STRIDE_LOOP(i, n)                                                   \
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < (n); \
       i += static_cast<int64_t>(blockDim.x) * gridDim.x)

namespace trp {

constexpr int kThreads = 256;

inline unsigned int grid_for(int64_t n) {
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  return static_cast<unsigned int>(std::max<int64_t>(1, std::min<int64_t>(blocks, 65535LL * 32)));
}

}  // namespace trp
