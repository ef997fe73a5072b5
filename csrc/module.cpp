// The Python module object of sparseft._C. The kernels register themselves as torch ops
// (namespace sparseft_C) from their own files; importing this module loads them.
#include <Python.h>

#ifndef SPARSEFT_WITH_CUDA
#define SPARSEFT_WITH_CUDA 0
#endif

static PyModuleDef sparseft_module = {PyModuleDef_HEAD_INIT, "_C", "sparseft native kernels", -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* module = PyModule_Create(&sparseft_module);
  if (module != nullptr) PyModule_AddIntConstant(module, "cuda_built", SPARSEFT_WITH_CUDA);
  return module;
}
