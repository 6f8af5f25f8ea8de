// A pool of CPU buffers reused across calls (one per process).
//
// Large CPU temporaries cost page faults when they are fresh: glibc returns freed memory to the
// system between calls (a trimmed heap top, or an unmapped chunk), and the next call's buffer of
// the same size clears new pages again. On the small MLPs of a PINN step that costs as much as
// the arithmetic (measured: the fused op's saved rows, ~5 % of a d=3, 4x64, N=4096 float32 step;
// the drop-ins' kept derivatives, 0.6-0.75x instead of ~1.0x torch.nn's speed for a nested-
// autograd Hessian diagonal, d=3, 4x64, N=4096, float32, CPU, 2 threads).
//
// The pool owns blocks of memory, not tensors. A block handed out becomes the storage of exactly
// one new tensor, whose deleter gives the block back when the last user of that storage goes (no
// tensor, no autograd graph, no Python object refers to it any more); it is handed out again only
// then, for the same byte size, most recently returned first (the one most likely still in
// cache). So a buffer is never shared, and the pool holds no reference to a storage in use: its
// use_count is that of an ordinary tensor's. (It matters: the autograd engine sums two gradients
// of one input in place only when it holds the last reference to the storage. An earlier pool
// that kept a reference to every storage made each such sum a fresh out-of-place add: in a
// drop-in's nested-autograd Hessian diagonal, exp, d=2, 3x32, N=4096, float32, 2 CPU threads,
// four adds per call at ~150 us each instead of ~15 us in place, 15 % of the call's CPU time.)
//
// At most kMaxItems blocks and kMaxBytes bytes are owned (in use or free); past that an output is
// an ordinary at::empty. The profiler's memory events (profile_memory=True) see a block as
// allocated while a tensor holds it and freed when it comes back, as they see the CPU
// allocator's tensors: live tensor bytes, not the pool's cache (like CUDA's memory_allocated).
// torchhessdiag.empty_cache() frees the free blocks and lets the ones in use be freed when their
// tensors go. CPU only: CUDA has its own caching allocator. Thread-safe (the deleter may run on
// any thread, e.g. an autograd worker's).
#pragma once

#include <ATen/ATen.h>
#include <c10/core/Allocator.h>
#include <c10/core/impl/alloc_cpu.h>

#include <cstdint>
#include <iterator>
#include <mutex>
#include <unordered_map>
#include <vector>

namespace thd {

class BufferPool {
 public:
  // Never destroyed: a tensor freed during interpreter teardown (after static destructors, in
  // whatever order the libraries unload) still finds the pool to give its block back to.
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
    void* p = nbytes > 0 && nbytes <= kMaxBytes ? take(nbytes) : nullptr;
    if (p == nullptr) return at::empty(shape, opt);
    report(p, nbytes);
    c10::Storage st(c10::Storage::use_byte_size_t(), nbytes,
                    c10::DataPtr(p, p, &BufferPool::give_back, c10::Device(c10::kCPU)),
                    /*allocator=*/nullptr, /*resizable=*/false);
    return at::empty({0}, opt).set_(std::move(st), 0, shape, c10::contiguous_strides(shape));
  }

  // Free the free blocks; the blocks in use are freed when their tensors go. Returns the bytes
  // released (both kinds).
  int64_t clear() {
    std::lock_guard<std::mutex> lock(mu_);
    int64_t released = 0;
    for (const FreeBlock& f : free_) {
      released += f.nbytes;
      blocks_.erase(f.p);
      c10::free_cpu(f.p);
    }
    free_.clear();
    for (auto& kv : blocks_)
      if (kv.second.generation == generation_) released += kv.second.nbytes;
    ++generation_;  // the blocks in use now belong to no generation the pool keeps
    owned_bytes_ = 0;
    owned_items_ = 0;
    return released;
  }

  // Bytes the pool owns (free, or in use and to be reused).
  int64_t bytes() {
    std::lock_guard<std::mutex> lock(mu_);
    return owned_bytes_;
  }

 private:
  struct Block {
    int64_t nbytes = 0;
    uint64_t generation = 0;
  };
  struct FreeBlock {  // (its size beside it: the scan for a size reads no map)
    void* p;
    int64_t nbytes;
  };

  // A free block of this size (most recently returned first), else a new one while the caps
  // allow (evicting the oldest free blocks to make room), else nullptr.
  void* take(int64_t nbytes) {
    std::lock_guard<std::mutex> lock(mu_);
    for (auto it = free_.rbegin(); it != free_.rend(); ++it)
      if (it->nbytes == nbytes) {
        void* p = it->p;
        free_.erase(std::next(it).base());
        in_use_bytes_ += nbytes;
        return p;
      }
    size_t i = 0;
    while ((owned_items_ >= kMaxItems || owned_bytes_ + nbytes > kMaxBytes) && i < free_.size()) {
      const FreeBlock old = free_[i++];
      owned_bytes_ -= old.nbytes;
      --owned_items_;
      blocks_.erase(old.p);
      c10::free_cpu(old.p);
    }
    free_.erase(free_.begin(), free_.begin() + static_cast<std::ptrdiff_t>(i));
    if (owned_items_ >= kMaxItems || owned_bytes_ + nbytes > kMaxBytes) return nullptr;
    void* p = c10::alloc_cpu(static_cast<size_t>(nbytes));
    blocks_[p] = Block{nbytes, generation_};
    owned_bytes_ += nbytes;
    in_use_bytes_ += nbytes;
    ++owned_items_;
    return p;
  }

  // The storage's deleter: the block goes back to the free list, or is freed if empty_cache()
  // ran since it was handed out.
  static void give_back(void* p) {
    BufferPool& pool = get();
    std::unique_lock<std::mutex> lock(pool.mu_);
    auto it = pool.blocks_.find(p);
    const int64_t nbytes = it->second.nbytes;
    pool.in_use_bytes_ -= nbytes;
    if (it->second.generation == pool.generation_) {
      pool.free_.push_back(FreeBlock{p, nbytes});
    } else {
      pool.blocks_.erase(it);
      c10::free_cpu(p);
    }
    lock.unlock();
    pool.report(p, -nbytes);
  }

  // To the profiler's memory events, when profile_memory is on.
  void report(void* p, int64_t delta) {
    if (!c10::memoryProfilingEnabled()) return;
    size_t in_use, owned;
    {
      std::lock_guard<std::mutex> lock(mu_);
      in_use = static_cast<size_t>(in_use_bytes_);
      owned = static_cast<size_t>(owned_bytes_);
    }
    c10::reportMemoryUsageToProfiler(p, delta, in_use, owned, c10::Device(c10::kCPU));
  }

  static constexpr size_t kMaxItems = 64;
  // 4 GiB: the fused op's saved rows of one large training step must all fit, or the ones left
  // out are page-faulted afresh every step (d = 100, 4x256, N = 4096, float32: four 420 MB
  // buffers; with a 1 GiB cap that step was 3-4 % slower than with no pool at all)
  static constexpr int64_t kMaxBytes = int64_t(4) << 30;
  std::mutex mu_;
  std::unordered_map<void*, Block> blocks_;  // every block the pool allocated and not yet freed
  std::vector<FreeBlock> free_;              // the free ones, oldest first
  int64_t owned_bytes_ = 0;                  // blocks of the current generation, in use or free
  size_t owned_items_ = 0;
  int64_t in_use_bytes_ = 0;  // blocks held by tensors (any generation)
  uint64_t generation_ = 0;
};

}  // namespace thd
