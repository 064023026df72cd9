// Each csrc/*.cpp registers its bindings here; mmfast_C.cpp calls them all when Python imports
// mmfast._C. Adding a kernel file needs no edit of any other file.
#pragma once
// ATen and PyTorch's pybind11 casters, not <torch/extension.h>: that one pulls in the whole C++ frontend
// (torch/all.h) and doubles each file's compile time (~28 s against ~14 s a file here).
#include <ATen/ATen.h>
#include <torch/csrc/utils/pybind.h>
#include <vector>

namespace mmfast {
using RegisterFn = void (*)(pybind11::module_&);
std::vector<RegisterFn>& registry();
struct Registrar {
  explicit Registrar(RegisterFn fn) { registry().push_back(fn); }
};
}  // namespace mmfast

#define MMFAST_REGISTER(fn) static ::mmfast::Registrar mmfast_registrar_##fn(fn)
