// A pool of CPU buffers reused across calls (one per process).
//
// Large CPU temporaries cost page faults when they are fresh: glibc returns freed memory to the
// system between calls (a trimmed heap top, or an unmapped chunk), and the next call's buffer of
// the same size clears new pages again. On the small MLPs of a PINN step that costs as much as
// the arithmetic (measured: the fused op's saved rows, ~5 % of a d=3, 4x64, N=4096 float32 step;
// the drop-ins' kept derivatives, 0.6-0.75x instead of ~1.0x torch.nn's speed for a nested-
// autograd Hessian diagonal, d=3, 4x64, N=4096, float32, CPU, 2 threads).
//
// The pool keeps the storages it has handed out and hands one out again only when nobody else
// holds it any more (use_count 1: no tensor, no autograd graph, no Python object refers to it),
// of the same byte size. So a buffer is never shared: a tensor the caller keeps stays its own.
// At most kMaxItems storages and kMaxBytes bytes are kept; torchhessdiag.empty_cache() drops them.
// CPU only: CUDA has its own caching allocator. Thread-safe.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <iterator>
#include <mutex>
#include <vector>

namespace thd {

class BufferPool {
 public:
  // Never destroyed: at process exit no storage is released from a static destructor (after
  // torch's own teardown, in whatever order the libraries unload); the OS takes the memory back.
  static BufferPool& get() {
    static BufferPool* p = new BufferPool();
    return *p;
  }

  // An uninitialised contiguous tensor of this shape (CPU; opt must be a CPU float type).
  at::Tensor empty(at::IntArrayRef shape, const at::TensorOptions& opt) {
    int64_t numel = 1;
    for (int64_t s : shape) numel *= s;
    const int64_t nbytes =
        numel * static_cast<int64_t>(c10::elementSize(opt.dtype().toScalarType()));
    if (nbytes == 0 || nbytes > kMaxBytes) return at::empty(shape, opt);
    {
      std::lock_guard<std::mutex> lock(mu_);
      // (The pool holds storages, not tensors: a tensor seen by Python may stay referenced by
      // its preserved Python object; a storage is free once no tensor uses it.)
      // newest first, and the one handed out moves to the back: a buffer used last is the one
      // most likely still in cache (the allocator's own reuse is last-freed-first too)
      for (auto it = items_.rbegin(); it != items_.rend(); ++it)
        if (it->use_count() == 1 && static_cast<int64_t>(it->nbytes()) == nbytes) {
          c10::Storage st = *it;
          items_.erase(std::next(it).base());
          items_.push_back(st);
          return at::empty({0}, opt).set_(st, 0, shape, c10::contiguous_strides(shape));
        }
    }
    at::Tensor t = at::empty(shape, opt);
    std::lock_guard<std::mutex> lock(mu_);
    if (items_.size() >= kMaxItems || bytes_locked() + nbytes > kMaxBytes) {
      // make room: drop one nobody uses (else keep this one out of the pool)
      for (auto it = items_.begin(); it != items_.end(); ++it)
        if (it->use_count() == 1) {
          items_.erase(it);
          break;
        }
    }
    if (items_.size() < kMaxItems && bytes_locked() + nbytes <= kMaxBytes)
      items_.push_back(t.storage());
    return t;
  }

  // Drop every storage (those still in use live on with their users); returns the bytes dropped.
  int64_t clear() {
    std::lock_guard<std::mutex> lock(mu_);
    const int64_t b = bytes_locked();
    items_.clear();
    return b;
  }

  int64_t bytes() {
    std::lock_guard<std::mutex> lock(mu_);
    return bytes_locked();
  }

 private:
  int64_t bytes_locked() const {
    int64_t b = 0;
    for (const c10::Storage& st : items_) b += static_cast<int64_t>(st.nbytes());
    return b;
  }

  static constexpr size_t kMaxItems = 64;
  // 4 GiB: the fused op's saved rows of one large training step must all fit, or the ones left
  // out are page-faulted afresh every step (d = 100, 4x256, N = 4096, float32: four 420 MB
  // buffers; with a 1 GiB cap that step was 3-4 % slower than with no pool at all)
  static constexpr int64_t kMaxBytes = int64_t(4) << 30;
  std::mutex mu_;
  std::vector<c10::Storage> items_;
};

}  // namespace thd
