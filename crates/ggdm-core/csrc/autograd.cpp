// Reverse-mode gradients with explicit output cotangents for ggdm-core: torch::autograd::grad with
// `grad_outputs`, which tch's API lacks (it back-propagates from scalars only, so a vector-Jacobian
// product there costs an extra product, sum and backward pass over the output). Tensors cross the
// boundary as tch's handles (pointers to at::Tensor). Returns nullptr on success or a heap-allocated
// error message that the caller frees with ddss_autograd_free_error.

#include <torch/csrc/autograd/autograd.h>

#include <cstring>
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

}  // extern "C"
