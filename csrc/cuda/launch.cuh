// What the grid-stride CUDA kernels share: how many blocks to launch.
#pragma once

#include <ATen/cuda/CUDAContext.h>

#include <cstdint>

namespace thd {

// Blocks for a grid-stride launch of `work_items` items, `per_block` per block: enough to fill the
// GPU (32 per SM), never more than the work needs.
inline unsigned grid_for(int64_t work_items, int64_t per_block) {
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t want = (work_items + per_block - 1) / per_block;
  const int64_t cap = static_cast<int64_t>(sms) * 32;
  return static_cast<unsigned>(want < cap ? want : cap);
}

}  // namespace thd
