// The Python module torchhessdiag._C. Importing it loads this shared library, whose static
// initialisers register the torchhessdiag ops with the dispatcher; the few functions below only
// describe the build, and the CUDA kernel-image probe's C++ half (csrc/cuda_probe.h).
#include <Python.h>

#include <atomic>
#include <cstring>
#include <string>

#include "activations.h"
#include "cpu/kernels.h"
#include "cuda_probe.h"
#include "mlp_ops.h"

#define THD_STR2(x) #x
#define THD_STR(x) THD_STR2(x)

namespace thd {
namespace {
// Per CUDA device: 0 = not asked yet, 1 = compiled kernels, 2 = reference (no kernel image).
constexpr int kMaxDevices = 256;
std::atomic<int> g_probe_state[kMaxDevices];

// torchhessdiag._cuda_probe.on_first_use(device) -> 1 (reference) / 0 (compiled kernels), with
// the GIL; -1 when Python raised (e.g. its warning turned into an error by -W error): printed as
// an unraisable exception, this call uses the compiled kernels and the next call asks again.
int ask_python(int device) {
  if (!Py_IsInitialized()) return 0;
  const PyGILState_STATE gil = PyGILState_Ensure();
  int answer = -1;
  PyObject* mod = PyImport_ImportModule("torchhessdiag._cuda_probe");
  PyObject* r = mod ? PyObject_CallMethod(mod, "on_first_use", "i", device) : nullptr;
  if (r != nullptr) answer = PyObject_IsTrue(r);  // -1 on error
  if (answer < 0) PyErr_WriteUnraisable(mod);
  Py_XDECREF(r);
  Py_XDECREF(mod);
  PyGILState_Release(gil);
  return answer;
}
}  // namespace

bool cuda_use_reference(int device) {
  if (device < 0 || device >= kMaxDevices) return false;
  const int s = g_probe_state[device].load(std::memory_order_acquire);
  if (s != 0) return s == 2;
  const int answer = ask_python(device);  // concurrent first calls both ask; Python answers alike
  if (answer >= 0) g_probe_state[device].store(answer ? 2 : 1, std::memory_order_release);
  return answer == 1;
}
}  // namespace thd

namespace thd {
void reset_piecewise_linear_warnings();  // csrc/act_ops.cpp
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

// The -gencode targets the CUDA kernels were built for ("sm_80 sm_90 compute_90"), "" without CUDA.
PyObject* cuda_archs(PyObject*, PyObject*) {
#ifdef THD_WITH_CUDA
  std::string s = THD_STR(THD_CUDA_ARCHS);
  for (size_t i; (i = s.find("__")) != std::string::npos;) s.replace(i, 2, " ");
  return PyUnicode_FromString(s.c_str());
#else
  return PyUnicode_FromString("");
#endif
}

// cuda_probe_launch(device) -> (cudaError code, name, message) of one empty kernel launched on
// that device; None in a build without CUDA kernels.
PyObject* cuda_probe_launch(PyObject*, PyObject* arg) {
  const long device = PyLong_AsLong(arg);
  if (device == -1 && PyErr_Occurred()) return nullptr;
#ifdef THD_WITH_CUDA
  PyThreadState* ts = PyEval_SaveThread();  // the first launch on a device creates its context
  const thd::ProbeResult r = thd::cuda_probe_launch(static_cast<int>(device));
  PyEval_RestoreThread(ts);
  return Py_BuildValue("(iss)", r.code, r.name ? r.name : "", r.message ? r.message : "");
#else
  (void)device;
  Py_RETURN_NONE;
#endif
}

// Forget the per-device answers (tests): the next call on each device asks the probe again.
PyObject* cuda_probe_reset(PyObject*, PyObject*) {
  for (auto& s : thd::g_probe_state) s.store(0);
  Py_RETURN_NONE;
}

// The cached answer for a device: 0 not asked yet, 1 compiled kernels, 2 reference.
PyObject* cuda_probe_state(PyObject*, PyObject* arg) {
  const long device = PyLong_AsLong(arg);
  if (device == -1 && PyErr_Occurred()) return nullptr;
  if (device < 0 || device >= thd::kMaxDevices) return PyLong_FromLong(0);
  return PyLong_FromLong(thd::g_probe_state[device].load());
}

PyObject* max_order(PyObject*, PyObject*) { return PyLong_FromLong(thd::kMaxOrder); }

PyObject* activations(PyObject*, PyObject*) {
  const int n = static_cast<int>(thd::Act::kCount);
  PyObject* t = PyTuple_New(n);
  if (!t) return nullptr;
  for (int i = 0; i < n; ++i) {
    PyObject* s = PyUnicode_FromString(thd::act_name(i));
    if (!s) {
      Py_DECREF(t);
      return nullptr;
    }
    PyTuple_SET_ITEM(t, i, s);
  }
  return t;
}

// ((name, linear, piecewise_linear, nonzero_param or None), ...) in table order: the C++ facts
// tests/test_registry.py compares with the Python registry.
PyObject* activation_info(PyObject*, PyObject*) {
  const int n = static_cast<int>(thd::Act::kCount);
  PyObject* t = PyTuple_New(n);
  if (!t) return nullptr;
  for (int i = 0; i < n; ++i) {
    const thd::ActInfo& a = thd::kActInfo[i];
    PyObject* e = a.nonzero_param != nullptr
                      ? Py_BuildValue("(sOOs)", a.name, a.linear ? Py_True : Py_False,
                                      a.piecewise_linear ? Py_True : Py_False, a.nonzero_param)
                      : Py_BuildValue("(sOOO)", a.name, a.linear ? Py_True : Py_False,
                                      a.piecewise_linear ? Py_True : Py_False, Py_None);
    if (!e) {
      Py_DECREF(t);
      return nullptr;
    }
    PyTuple_SET_ITEM(t, i, e);
  }
  return t;
}

PyObject* cpu_isa(PyObject*, PyObject*) { return PyUnicode_FromString(thd::cpu::kernels().name); }

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
    PyErr_Format(PyExc_ValueError, "set_cpu_isa: expected 'scalar', 'avx2' or 'avx512', got '%s'",
                 s);
    return nullptr;
  }
  return PyUnicode_FromString(thd::cpu::set_max_isa(isa).name);
}

PyObject* empty_cache(PyObject*, PyObject*) {
  return PyLong_FromLongLong(thd::buffer_pool_clear());
}
PyObject* cache_bytes(PyObject*, PyObject*) {
  return PyLong_FromLongLong(thd::buffer_pool_bytes());
}

PyMethodDef kMethods[] = {
    {"empty_cache", empty_cache, METH_NOARGS,
     "Release the pooled CPU buffers (csrc/buffer_pool.h); returns the bytes released."},
    {"cache_bytes", cache_bytes, METH_NOARGS, "Bytes held by the CPU buffer pool."},
    {"cpu_isa", cpu_isa, METH_NOARGS, "Instruction set of the CPU kernels in use."},
    {"set_cpu_isa", set_cpu_isa, METH_O,
     "Use at most this instruction set ('scalar', 'avx2', 'avx512') for the CPU kernels."},
    {"cuda_compiled", cuda_compiled, METH_NOARGS, "True if the CUDA kernels were compiled in."},
    {"cuda_archs", cuda_archs, METH_NOARGS,
     "The -gencode targets of the CUDA kernels ('' if none)."},
    {"cuda_probe_launch", cuda_probe_launch, METH_O,
     "(code, name, message) of an empty kernel launch on a device."},
    {"cuda_probe_reset", cuda_probe_reset, METH_NOARGS, "Forget the per-device probe answers."},
    {"cuda_probe_state", cuda_probe_state, METH_O,
     "0 not probed, 1 compiled kernels, 2 reference."},
    {"max_order", max_order, METH_NOARGS, "Highest derivative order in the table."},
    {"activations", activations, METH_NOARGS, "Names of the activations in the table."},
    {"activation_info", activation_info, METH_NOARGS,
     "(name, linear, piecewise_linear, nonzero parameter or None) per activation of the table."},
    {"_reset_piecewise_linear_warnings", reset_pwl_warnings, METH_NOARGS,
     "Let the once-per-process piecewise-linear warning of the drop-ins fire again (tests)."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef kModule = {PyModuleDef_HEAD_INIT, "_C",
                       "torchhessdiag compiled kernels (ops live in torch.ops.torchhessdiag)", -1,
                       kMethods};

}  // namespace

extern "C" PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&kModule); }
