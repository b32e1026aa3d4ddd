// Host-memory helpers shared by the C++ ops.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace anytime_kernels {

// Ops that write every byte of a large fresh output (tens to hundreds of MB per batch) pay more
// for first-touch page faults than for the writes themselves, notably in VMs. Asking for
// transparent huge pages on the buffer's whole 2 MiB pages (as torch's THP_MEM_ALLOC_ENABLE does)
// takes 512x fewer faults. Advisory only: where the kernel declines, the buffer works as before.
inline void advise_huge_pages(void* data, int64_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHugePage = uintptr_t{1} << 21;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(data) + kHugePage - 1) & ~(kHugePage - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(data) + static_cast<uintptr_t>(bytes)) & ~(kHugePage - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)data;
  (void)bytes;
#endif
}

// at::empty on the CPU with huge pages advised before anything touches the memory.
inline at::Tensor empty_huge(at::IntArrayRef sizes, at::ScalarType dtype) {
  at::Tensor out = at::empty(sizes, at::TensorOptions().dtype(dtype));
  advise_huge_pages(out.data_ptr(), out.nbytes());
  return out;
}

}  // namespace anytime_kernels
