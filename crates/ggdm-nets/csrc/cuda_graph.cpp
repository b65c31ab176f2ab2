// CUDA graph capture and replay for ggdm-core's `cuda-graphs` feature: a thin C interface over
// at::cuda::CUDAGraph and a side-stream guard (capture must not run on the default stream).
// Every function returns nullptr on success or a heap-allocated error message that the caller
// frees with ddss_graph_free_error.

#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAStream.h>

#include <cstring>
#include <exception>
#include <optional>
#include <string>

namespace {

char* copy_message(const std::string& message) {
  char* out = new char[message.size() + 1];
  std::memcpy(out, message.c_str(), message.size() + 1);
  return out;
}

template <typename F>
char* guarded(F&& f) {
  try {
    f();
    return nullptr;
  } catch (const std::exception& e) {
    return copy_message(e.what());
  } catch (...) {
    return copy_message("unknown C++ exception");
  }
}

// The side stream a capture (and its warm-up) runs on, and the stream it replaced. Streams are
// switched with c10's exported setters rather than the inline guard classes, so this file needs no
// symbol from the CUDA runtime itself.
struct SideStream {
  c10::cuda::CUDAStream previous;
  c10::cuda::CUDAStream side;
};

}  // namespace

extern "C" {

void ddss_graph_free_error(char* message) { delete[] message; }

// Makes a pooled side stream current on `device` (after it waits for the current stream).
char* ddss_side_stream_enter(int device, void** out) {
  return guarded([&] {
    c10::DeviceIndex index = static_cast<c10::DeviceIndex>(device);
    c10::cuda::set_device(index);
    auto previous = c10::cuda::getCurrentCUDAStream(index);
    auto side = c10::cuda::getStreamFromPool(false, index);
    // Entering and leaving a capture is rare: a device-wide sync orders the streams without
    // needing the CUDA runtime's event API here.
    c10::cuda::device_synchronize();
    // Blocks cached for the current stream cannot serve the side stream or the graph's pool:
    // return them first, so the warm-up and the capture can reuse that memory.
    c10::cuda::CUDACachingAllocator::emptyCache();
    c10::cuda::setCurrentCUDAStream(side);
    *out = new SideStream{previous, side};
  });
}

// Waits for everything queued on the side stream, restores the previous stream and releases the
// cached blocks nobody uses.
char* ddss_side_stream_exit(void* handle) {
  return guarded([&] {
    auto* s = static_cast<SideStream*>(handle);
    auto previous = s->previous;
    delete s;
    c10::cuda::device_synchronize();
    c10::cuda::setCurrentCUDAStream(previous);
    // The warm-up calls cached their memory for the side stream, where the eager work that follows
    // (on the previous stream) cannot reuse it: hand the unused blocks back. Graph pools stay.
    c10::cuda::CUDACachingAllocator::emptyCache();
  });
}

char* ddss_graph_new(void** out) {
  return guarded([&] { *out = new at::cuda::CUDAGraph(); });
}

// A memory-pool id that several captures can share (at::cuda::graph_pool_handle).
char* ddss_graph_pool_handle(unsigned long long* first, unsigned long long* second) {
  return guarded([&] {
    auto id = at::cuda::graph_pool_handle();
    *first = id.first;
    *second = id.second;
  });
}

// Begins capturing on the current stream into the pool (first, second); (0, 0) is a private pool.
char* ddss_graph_capture_begin(void* graph, unsigned long long first, unsigned long long second) {
  return guarded([&] { static_cast<at::cuda::CUDAGraph*>(graph)->capture_begin({first, second}); });
}

char* ddss_graph_capture_end(void* graph) {
  return guarded([&] { static_cast<at::cuda::CUDAGraph*>(graph)->capture_end(); });
}

char* ddss_graph_replay(void* graph) {
  return guarded([&] { static_cast<at::cuda::CUDAGraph*>(graph)->replay(); });
}

// Bytes of device `device` in the caching allocator's private pools (those of CUDA graphs): whole
// segments (`reserved`) and the blocks in use in them (`allocated`). A replay uses its pool's
// memory without the allocator counting it as allocated.
char* ddss_private_pool_bytes(int device, unsigned long long* reserved, unsigned long long* allocated) {
  return guarded([&] {
    unsigned long long held = 0;
    unsigned long long used = 0;
    for (const auto& segment : c10::cuda::CUDACachingAllocator::snapshot({0, 0}, false).segments) {
      const auto& owner = segment.owner_private_pool_id;
      if (segment.device != device || (owner.first == 0 && owner.second == 0)) {
        continue;
      }
      held += segment.total_size;
      used += segment.allocated_size;
    }
    *reserved = held;
    *allocated = used;
  });
}

void ddss_graph_delete(void* graph) {
  try {
    delete static_cast<at::cuda::CUDAGraph*>(graph);
  } catch (...) {
  }
}

}  // extern "C"
