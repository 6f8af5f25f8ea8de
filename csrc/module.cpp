// The Python module torchhessdiag._C. Importing it loads this shared library, whose static
// initialisers register the torchhessdiag ops with the dispatcher; the few functions below only
// describe the build.
#include <Python.h>

#include "activations.h"

namespace {

PyObject* cuda_compiled(PyObject*, PyObject*) {
#ifdef THD_WITH_CUDA
  Py_RETURN_TRUE;
#else
  Py_RETURN_FALSE;
#endif
}

PyObject* max_order(PyObject*, PyObject*) { return PyLong_FromLong(thd::kMaxOrder); }

PyObject* activations(PyObject*, PyObject*) {
  const int n = static_cast<int>(thd::Act::kCount);
  PyObject* t = PyTuple_New(n);
  if (!t) return nullptr;
  for (int i = 0; i < n; ++i) {
    PyObject* s = PyUnicode_FromString(thd::kActNames[i]);
    if (!s) {
      Py_DECREF(t);
      return nullptr;
    }
    PyTuple_SET_ITEM(t, i, s);
  }
  return t;
}

PyMethodDef kMethods[] = {
    {"cuda_compiled", cuda_compiled, METH_NOARGS, "True if the CUDA kernels were compiled in."},
    {"max_order", max_order, METH_NOARGS, "Highest derivative order in the table."},
    {"activations", activations, METH_NOARGS, "Names of the activations in the table."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef kModule = {PyModuleDef_HEAD_INIT, "_C",
                       "torchhessdiag compiled kernels (ops live in torch.ops.torchhessdiag)", -1,
                       kMethods};

}  // namespace

extern "C" PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&kModule); }
