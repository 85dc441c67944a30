// Block reduction of the per-query point sums, shared by the point_mask CUDA kernels.
#pragma once

#include "cuda_launch.cuh"
#include "point_mask/point_mask.h"

namespace trp {
namespace point_mask {

// Sum of every thread's Sums over one block of kThreads threads; every thread gets the total.
template <typename acc_t>
__device__ Sums<acc_t> block_sums(const Sums<acc_t>& s) {
  __shared__ acc_t shared[4][kThreads];
  shared[0][threadIdx.x] = s.ce;
  shared[1][threadIdx.x] = s.prob;
  shared[2][threadIdx.x] = s.target;
  shared[3][threadIdx.x] = s.inter;
  __syncthreads();
  for (unsigned int stride = blockDim.x / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) {
      for (int c = 0; c < 4; ++c) {
        shared[c][threadIdx.x] += shared[c][threadIdx.x + stride];
      }
    }
    __syncthreads();
  }
  Sums<acc_t> total;
  total.ce = shared[0][0];
  total.prob = shared[1][0];
  total.target = shared[2][0];
  total.inter = shared[3][0];
  return total;
}

}  // namespace point_mask
}  // namespace trp
