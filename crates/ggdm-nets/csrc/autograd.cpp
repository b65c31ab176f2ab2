// Reverse-mode gradients for ggdm-core that tch's API lacks: torch::autograd::grad with
// `grad_outputs` (tch back-propagates from scalars only, so a vector-Jacobian product there costs an
// extra product, sum and backward pass over the output), and GroupNorm's input gradient from the
// statistics of its forward pass (at::native_group_norm_backward, which tch does not expose). Tensors cross the
// boundary as tch's handles (pointers to at::Tensor). Returns nullptr on success or a heap-allocated
// error message that the caller frees with ddss_autograd_free_error.

#include <ATen/ops/native_group_norm_backward.h>
#include <torch/csrc/autograd/autograd.h>

#include <cstring>
#include <optional>
#include <exception>
#include <string>
#include <vector>

namespace {

char* copy_message(const std::string& message) {
  char* out = new char[message.size() + 1];
  std::memcpy(out, message.c_str(), message.size() + 1);
  return out;
}

}  // namespace

extern "C" {

void ddss_autograd_free_error(char* message) { delete[] message; }

// `results[k]` (new handles, undefined where an input is unused) = d sum_j <outputs[j], grads[j]>
// / d inputs[k]. The graph is freed afterwards.
char* ddss_autograd_grad(at::Tensor** outputs, at::Tensor** grads, int n_outputs, at::Tensor** inputs,
                         int n_inputs, at::Tensor** results) {
  try {
    std::vector<at::Tensor> out(n_outputs), grad(n_outputs), in(n_inputs);
    for (int j = 0; j < n_outputs; ++j) {
      out[j] = *outputs[j];
      grad[j] = *grads[j];
    }
    for (int k = 0; k < n_inputs; ++k) {
      in[k] = *inputs[k];
    }
    auto computed = torch::autograd::grad(out, in, grad, /*retain_graph=*/false, /*create_graph=*/false,
                                          /*allow_unused=*/true);
    for (int k = 0; k < n_inputs; ++k) {
      results[k] = new at::Tensor(computed[k]);
    }
    return nullptr;
  } catch (const std::exception& e) {
    return copy_message(e.what());
  } catch (...) {
    return copy_message("unknown C++ exception");
  }
}

// `*result` (a new handle) = the input gradient of a GroupNorm with `groups` groups from the
// gradient `grad_out` of its output, its `input` and the per-group `mean` and `rstd` its forward
// pass computed (at::native_group_norm's second and third outputs); `weight` may be null.
char* ddss_group_norm_input_grad(at::Tensor* grad_out, at::Tensor* input, at::Tensor* mean, at::Tensor* rstd,
                                 at::Tensor* weight, int64_t groups, at::Tensor** result) {
  try {
    const int64_t n = input->size(0);
    const int64_t c = input->size(1);
    const int64_t hxw = n * c == 0 ? 0 : input->numel() / (n * c);
    std::optional<at::Tensor> w;
    if (weight != nullptr) {
      w = *weight;
    }
    auto grads = at::native_group_norm_backward(grad_out->contiguous(), input->contiguous(), *mean, *rstd, w, n, c,
                                                hxw, groups, {true, false, false});
    *result = new at::Tensor(std::get<0>(grads));
    return nullptr;
  } catch (const std::exception& e) {
    return copy_message(e.what());
  } catch (...) {
    return copy_message("unknown C++ exception");
  }
}

}  // extern "C"
