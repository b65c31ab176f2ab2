// Memory statistics for ggdm-core's `memory` module: the device caching allocator's counters
// (what torch.cuda.memory_allocated / max_memory_allocated report) through c10's device-generic
// allocator interface, and glibc's malloc_trim for host measurements. Only libtorch headers are
// needed (no CUDA headers), so this file is always compiled. Every function returns 0 on success
// and 1 when the statistic is unavailable (no such allocator, not initialised, or an exception).

#include <c10/core/CachingDeviceAllocator.h>
#include <c10/core/DeviceType.h>

#include <cstdint>
#include <exception>

#ifdef __GLIBC__
#include <malloc.h>
#endif

namespace {

c10::DeviceAllocator* device_allocator(int device_type) {
  auto type = static_cast<c10::DeviceType>(device_type);
  if (type == c10::DeviceType::CPU) {
    return nullptr;
  }
  auto* allocator = dynamic_cast<c10::DeviceAllocator*>(c10::GetAllocator(type));
  if (allocator == nullptr || !allocator->initialized()) {
    return nullptr;
  }
  return allocator;
}

}  // namespace

extern "C" {

// out[0..4]: bytes allocated now, peak allocated since the last reset, reserved now, peak reserved.
int ddss_device_memory_stats(int device_type, int device_index, int64_t* out) {
  try {
    auto* allocator = device_allocator(device_type);
    if (allocator == nullptr) {
      return 1;
    }
    auto stats = allocator->getDeviceStats(static_cast<c10::DeviceIndex>(device_index));
    constexpr auto all = static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE);
    out[0] = stats.allocated_bytes[all].current;
    out[1] = stats.allocated_bytes[all].peak;
    out[2] = stats.reserved_bytes[all].current;
    out[3] = stats.reserved_bytes[all].peak;
    return 0;
  } catch (...) {
    return 1;
  }
}

int ddss_device_memory_reset_peak(int device_type, int device_index) {
  try {
    auto* allocator = device_allocator(device_type);
    if (allocator == nullptr) {
      return 1;
    }
    allocator->resetPeakStats(static_cast<c10::DeviceIndex>(device_index));
    return 0;
  } catch (...) {
    return 1;
  }
}

// Returns the host heap's free pages to the system, so that the resident set size counts live
// memory only.
int ddss_host_release_free_memory() {
#ifdef __GLIBC__
  malloc_trim(0);
  return 0;
#else
  return 1;
#endif
}

}  // extern "C"
