/* earkit._native is importable as a Python module so that pip installs it with the package and
 * `earkit._native.__file__` locates it; the kernels themselves are plain C functions loaded with
 * ctypes (kernels/native.py), so this module defines nothing else. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

static struct PyModuleDef native_module = {
    PyModuleDef_HEAD_INIT, "_native",
    "CPU twin of earkit's loss kernels; its C functions are called through ctypes.", -1, NULL,
};

PyMODINIT_FUNC PyInit__native(void) { return PyModule_Create(&native_module); }
