#include "registry.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace mmfast {
std::vector<RegisterFn>& registry() {
  static std::vector<RegisterFn> fns;
  return fns;
}
}  // namespace mmfast

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "mmfast C++ CPU kernels";
  m.def("openmp_threads", []() {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
  });
  for (auto fn : mmfast::registry()) fn(m);
}
