// Python module stub for anytime_kernels._C. The ops register themselves with the dispatcher
// (TORCH_LIBRARY_FRAGMENT in each source file) when this shared library is loaded; the module
// itself exposes nothing, so it needs only Python.h and not pybind11.
#include <Python.h>

extern "C" {
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",  // name
      "Compiled ops of anytime_kernels, reachable as torch.ops.anytime_kernels.*",
      -1,      // size
      nullptr  // methods
  };
  return PyModule_Create(&module_def);
}
}
