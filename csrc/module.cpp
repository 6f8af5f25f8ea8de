// The Python module torchhessdiag._C. Importing it loads this shared library, whose static
// initialisers register the torchhessdiag ops with the dispatcher; the few functions below only
// describe the build.
#include <Python.h>

#include <cstring>

#include "activations.h"
#include "cpu/kernels.h"

namespace thd {
void reset_piecewise_linear_warnings();  // csrc/jet_ops.cpp
}

namespace {

PyObject* reset_pwl_warnings(PyObject*, PyObject*) {
  thd::reset_piecewise_linear_warnings();
  Py_RETURN_NONE;
}

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

PyObject* cpu_isa(PyObject*, PyObject*) {
  return PyUnicode_FromString(thd::cpu::kernels().name);
}

// set_cpu_isa("scalar" | "avx2" | "avx512"): use at most that instruction set (the widest usable
// one up to it); returns the name of the build now in use. For tests and benchmarks.
PyObject* set_cpu_isa(PyObject*, PyObject* arg) {
  const char* s = PyUnicode_AsUTF8(arg);
  if (s == nullptr) return nullptr;
  thd::cpu::Isa isa;
  if (std::strcmp(s, "scalar") == 0) {
    isa = thd::cpu::Isa::Scalar;
  } else if (std::strcmp(s, "avx2") == 0) {
    isa = thd::cpu::Isa::AVX2;
  } else if (std::strcmp(s, "avx512") == 0) {
    isa = thd::cpu::Isa::AVX512;
  } else {
    PyErr_Format(PyExc_ValueError,
                 "set_cpu_isa: expected 'scalar', 'avx2' or 'avx512', got '%s'", s);
    return nullptr;
  }
  return PyUnicode_FromString(thd::cpu::set_max_isa(isa).name);
}

PyMethodDef kMethods[] = {
    {"cpu_isa", cpu_isa, METH_NOARGS, "Instruction set of the CPU kernels in use."},
    {"set_cpu_isa", set_cpu_isa, METH_O,
     "Use at most this instruction set ('scalar', 'avx2', 'avx512') for the CPU kernels."},
    {"cuda_compiled", cuda_compiled, METH_NOARGS, "True if the CUDA kernels were compiled in."},
    {"max_order", max_order, METH_NOARGS, "Highest derivative order in the table."},
    {"activations", activations, METH_NOARGS, "Names of the activations in the table."},
    {"_reset_piecewise_linear_warnings", reset_pwl_warnings, METH_NOARGS,
     "Let the once-per-process piecewise-linear warning of the drop-ins fire again (tests)."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef kModule = {PyModuleDef_HEAD_INIT, "_C",
                       "torchhessdiag compiled kernels (ops live in torch.ops.torchhessdiag)", -1,
                       kMethods};

}  // namespace

extern "C" PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&kModule); }
