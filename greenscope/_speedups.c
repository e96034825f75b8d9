/* greenscope._speedups: the registry's hit path, compiled.
 *
 * Optional: greenscope/registry.py uses it when it was built (CPython, a C compiler at install
 * time) and GREENSCOPE_PURE is not set; otherwise the pure-Python hit path runs. Both take the
 * same decision (tests/test_hot_path.py runs under each), this one without a Python frame:
 *
 *   fast = registry._hot_var.get()           # this context's cached _Fast, or None
 *   hit if fast.owner is getcurrent() and no loop runs in this thread,
 *       or fast.owner is the running task of the running loop
 *   -> fast.value; anything else -> the pure-Python slow path (``fallback``).
 *
 * What is here:
 *   Fast        the cache cell (owner, value), a C twin of registry._Fast;
 *   HotCall     a method descriptor for ``WeakScopeRegistry.__call__`` (kind 0) and
 *               ``scoped_session.__call__`` (kind 1: the Session must not be an AsyncSession,
 *               whose stock path warns) and ``async_scoped_session.__call__`` (kind 2);
 *   HotProperty a data descriptor for ``scoped_session._proxied`` (kinds as above).
 * ``setup()`` gives it the registry class (the offset of its ``_hot_var`` slot is read from the
 * slot's member descriptor) and the three functions that tell who is running.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stddef.h>
#include <structmember.h>

#if PY_VERSION_HEX < 0x030A0000
static inline PyObject *
Py_NewRef(PyObject *obj)
{
    Py_INCREF(obj);
    return obj;
}

static int
PyModule_AddObjectRef(PyObject *module, const char *name, PyObject *value)
{
    Py_INCREF(value);
    if (PyModule_AddObject(module, name, value) < 0) {
        Py_DECREF(value);
        return -1;
    }
    return 0;
}
#endif

static PyTypeObject *registry_type = NULL;
static Py_ssize_t hot_offset = -1;
static PyObject *getcurrent_fn = NULL;
static PyObject *running_loop_fn = NULL;
static PyObject *current_task_fn = NULL;
static PyObject *str_registry = NULL;
static PyObject *str_is_asyncio = NULL;

/* -- Fast --------------------------------------------------------------------------------- */

typedef struct {
    PyObject_HEAD
    PyObject *owner;
    PyObject *value;
    PyObject *weakreflist;
} FastObject;

static PyTypeObject FastType;

static PyObject *
fast_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    PyObject *owner, *value;
    static char *kwlist[] = {"owner", "value", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OO:Fast", kwlist, &owner, &value)) {
        return NULL;
    }
    FastObject *self = (FastObject *)type->tp_alloc(type, 0);
    if (self == NULL) {
        return NULL;
    }
    self->owner = Py_NewRef(owner);
    self->value = Py_NewRef(value);
    return (PyObject *)self;
}

static int
fast_traverse(FastObject *self, visitproc visit, void *arg)
{
    Py_VISIT(self->owner);
    Py_VISIT(self->value);
    return 0;
}

static int
fast_clear(FastObject *self)
{
    Py_CLEAR(self->owner);
    Py_CLEAR(self->value);
    return 0;
}

static void
fast_dealloc(FastObject *self)
{
    PyObject_GC_UnTrack(self);
    if (self->weakreflist != NULL) {
        PyObject_ClearWeakRefs((PyObject *)self);
    }
    fast_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMemberDef fast_members[] = {
    {"owner", T_OBJECT_EX, offsetof(FastObject, owner), 0, "the greenlet or task that may hit"},
    {"value", T_OBJECT_EX, offsetof(FastObject, value), 0, "the cached value"},
    {NULL},
};

static PyTypeObject FastType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "greenscope._speedups.Fast",
    .tp_basicsize = sizeof(FastObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "Fast(owner, value): what a context caches for the registry's hit path.",
    .tp_new = fast_new,
    .tp_traverse = (traverseproc)fast_traverse,
    .tp_clear = (inquiry)fast_clear,
    .tp_dealloc = (destructor)fast_dealloc,
    .tp_members = fast_members,
    .tp_weaklistoffset = offsetof(FastObject, weakreflist),
};

/* -- the hit test ------------------------------------------------------------------------- */

/* The value cached for the caller in ``registry``: a new reference; NULL without an exception
 * for a miss; NULL with one on error. */
static PyObject *
hot_value(PyObject *registry)
{
    if (registry_type == NULL || !PyObject_TypeCheck(registry, registry_type)) {
        return NULL;
    }
    PyObject *var = *(PyObject **)((char *)registry + hot_offset);
    if (var == NULL || var == Py_None) {  /* a custom scopefunc, or values parked */
        return NULL;
    }
    PyObject *cached;
    if (PyContextVar_Get(var, NULL, &cached) < 0) {
        return NULL;
    }
    if (cached == NULL) {
        return NULL;
    }
    PyObject *result = NULL;
    if (Py_IS_TYPE(cached, &FastType)) {
        FastObject *fast = (FastObject *)cached;
        PyObject *current = PyObject_CallNoArgs(getcurrent_fn);
        if (current == NULL) {
            goto done;
        }
        int mine = fast->owner == current;
        Py_DECREF(current);
        PyObject *loop = PyObject_CallNoArgs(running_loop_fn);
        if (loop == NULL) {
            goto done;
        }
        if (mine) {
            if (loop == Py_None) {
                result = fast->value;
            }
        }
        else if (loop != Py_None) {
            PyObject *task = PyObject_CallOneArg(current_task_fn, loop);
            if (task == NULL) {
                Py_DECREF(loop);
                goto done;
            }
            if (task == fast->owner && task != Py_None) {
                result = fast->value;
            }
            Py_DECREF(task);
        }
        Py_DECREF(loop);
        Py_XINCREF(result);
    }
done:
    Py_DECREF(cached);
    return result;
}

/* kind 0: ``obj`` is the registry; 1 and 2: a scoped_session holding it in ``.registry``. Kind 1
 * refuses an AsyncSession (``_is_asyncio``), as ``scoped_session.__call__`` warns about it. */
static PyObject *
hot_for(PyObject *obj, int kind)
{
    if (kind == 0) {
        return hot_value(obj);
    }
    PyObject *registry = PyObject_GetAttr(obj, str_registry);
    if (registry == NULL) {
        return NULL;
    }
    PyObject *value = hot_value(registry);
    Py_DECREF(registry);
    if (value != NULL && kind == 1) {
        PyObject *is_asyncio = PyObject_GetAttr(value, str_is_asyncio);
        if (is_asyncio != Py_False) {
            Py_DECREF(value);
            value = NULL;
            if (is_asyncio == NULL) {
                PyErr_Clear();  /* no such attribute: let the stock path decide */
            }
        }
        Py_XDECREF(is_asyncio);
    }
    return value;
}

/* -- HotCall: a method descriptor ---------------------------------------------------------- */

typedef struct {
    PyObject_HEAD
    PyObject *fallback;
    PyObject *wrapped;
    int kind;
    vectorcallfunc vectorcall;
} HotObject;

static int
hot_traverse(HotObject *self, visitproc visit, void *arg)
{
    Py_VISIT(self->fallback);
    Py_VISIT(self->wrapped);
    return 0;
}

static int
hot_clear(HotObject *self)
{
    Py_CLEAR(self->fallback);
    Py_CLEAR(self->wrapped);
    return 0;
}

static void
hot_dealloc(HotObject *self)
{
    PyObject_GC_UnTrack(self);
    hot_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *
hotcall_vectorcall(PyObject *callable, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    HotObject *self = (HotObject *)callable;
    if (PyVectorcall_NARGS(nargsf) == 1 && (kwnames == NULL || PyTuple_GET_SIZE(kwnames) == 0)) {
        PyObject *value = hot_for(args[0], self->kind);
        if (value != NULL || PyErr_Occurred()) {
            return value;
        }
    }
    return PyObject_Vectorcall(self->fallback, args, nargsf, kwnames);
}

static PyObject *
hot_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    PyObject *fallback, *wrapped = NULL;
    int kind;
    static char *kwlist[] = {"fallback", "kind", "wrapped", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "Oi|O", kwlist, &fallback, &kind, &wrapped)) {
        return NULL;
    }
    if (!PyCallable_Check(fallback) || kind < 0 || kind > 2) {
        PyErr_SetString(PyExc_TypeError, "fallback must be callable and kind 0, 1 or 2");
        return NULL;
    }
    HotObject *self = (HotObject *)type->tp_alloc(type, 0);
    if (self == NULL) {
        return NULL;
    }
    self->fallback = Py_NewRef(fallback);
    self->wrapped = Py_NewRef(wrapped != NULL ? wrapped : fallback);
    self->kind = kind;
    self->vectorcall = hotcall_vectorcall;
    return (PyObject *)self;
}

static PyObject *
hotcall_get(PyObject *self, PyObject *obj, PyObject *type)
{
    if (obj == NULL || obj == Py_None) {
        return Py_NewRef(self);
    }
    return PyMethod_New(self, obj);
}

/* ``__doc__``, ``__name__``... are those of ``__wrapped__`` (the pure-Python twin), for inspect
 * and help(). */
static PyObject *
hot_getattro(PyObject *self, PyObject *name)
{
    PyObject *found = PyObject_GenericGetAttr(self, name);
    if (found != NULL || !PyErr_ExceptionMatches(PyExc_AttributeError)) {
        return found;
    }
    PyErr_Clear();
    return PyObject_GetAttr(((HotObject *)self)->wrapped, name);
}

static PyObject *
hot_forward(PyObject *self, void *name)
{
    return PyObject_GetAttrString(((HotObject *)self)->wrapped, (const char *)name);
}

static PyGetSetDef hot_getset[] = {
    {"__doc__", hot_forward, NULL, NULL, "__doc__"},
    {"__name__", hot_forward, NULL, NULL, "__name__"},
    {"__qualname__", hot_forward, NULL, NULL, "__qualname__"},
    {"__module__", hot_forward, NULL, NULL, "__module__"},
    {NULL},
};

static PyMemberDef hot_members[] = {
    {"__wrapped__", T_OBJECT, offsetof(HotObject, wrapped), READONLY, "the pure-Python twin"},
    {"fallback", T_OBJECT, offsetof(HotObject, fallback), READONLY, "called on a miss"},
    {"kind", T_INT, offsetof(HotObject, kind), READONLY, "0 registry, 1 sync session, 2 async"},
    {NULL},
};

static PyTypeObject HotCallType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "greenscope._speedups.HotCall",
    .tp_basicsize = sizeof(HotObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL
        | Py_TPFLAGS_METHOD_DESCRIPTOR,
    .tp_doc = "HotCall(fallback, kind, wrapped=fallback): a ``__call__`` that returns the cached\n"
              "value on a hit and calls ``fallback`` (the slow path) on a miss.",
    .tp_new = hot_new,
    .tp_traverse = (traverseproc)hot_traverse,
    .tp_clear = (inquiry)hot_clear,
    .tp_dealloc = (destructor)hot_dealloc,
    .tp_vectorcall_offset = offsetof(HotObject, vectorcall),
    .tp_call = PyVectorcall_Call,
    .tp_descr_get = hotcall_get,
    .tp_getattro = hot_getattro,
    .tp_members = hot_members,
    .tp_getset = hot_getset,
};

/* -- HotProperty: a read-only data descriptor ---------------------------------------------- */

static PyObject *
hotprop_get(PyObject *self, PyObject *obj, PyObject *type)
{
    if (obj == NULL || obj == Py_None) {
        return Py_NewRef(self);
    }
    PyObject *value = hot_for(obj, ((HotObject *)self)->kind);
    if (value != NULL || PyErr_Occurred()) {
        return value;
    }
    return PyObject_CallOneArg(((HotObject *)self)->fallback, obj);
}

static int
hotprop_set(PyObject *self, PyObject *obj, PyObject *value)
{
    PyErr_SetString(PyExc_AttributeError, "read-only attribute");
    return -1;
}

static PyTypeObject HotPropertyType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "greenscope._speedups.HotProperty",
    .tp_basicsize = sizeof(HotObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "HotProperty(fallback, kind, wrapped=fallback): a property returning the cached\n"
              "value on a hit and ``fallback(obj)`` on a miss.",
    .tp_new = hot_new,
    .tp_traverse = (traverseproc)hot_traverse,
    .tp_clear = (inquiry)hot_clear,
    .tp_dealloc = (destructor)hot_dealloc,
    .tp_descr_get = hotprop_get,
    .tp_descr_set = hotprop_set,
    .tp_getattro = hot_getattro,
    .tp_members = hot_members,
    .tp_getset = hot_getset,
};

/* -- setup --------------------------------------------------------------------------------- */

static PyObject *
speedups_setup(PyObject *module, PyObject *args)
{
    PyObject *cls, *getcurrent, *running_loop, *current_task;
    if (!PyArg_ParseTuple(args, "O!OOO:setup", &PyType_Type, &cls, &getcurrent, &running_loop,
                          &current_task)) {
        return NULL;
    }
    PyObject *descr = PyObject_GetAttrString(cls, "_hot_var");
    if (descr == NULL) {
        return NULL;
    }
    int ok = Py_IS_TYPE(descr, &PyMemberDescr_Type)
        && ((PyMemberDescrObject *)descr)->d_member->type == T_OBJECT_EX
        && ((PyMemberDescrObject *)descr)->d_common.d_type == (PyTypeObject *)cls;
    Py_ssize_t offset = ok ? ((PyMemberDescrObject *)descr)->d_member->offset : -1;
    Py_DECREF(descr);
    if (!ok) {
        PyErr_SetString(PyExc_TypeError, "setup: _hot_var must be a __slots__ member of the class");
        return NULL;
    }
    Py_XSETREF(registry_type, (PyTypeObject *)Py_NewRef(cls));
    hot_offset = offset;
    Py_XSETREF(getcurrent_fn, Py_NewRef(getcurrent));
    Py_XSETREF(running_loop_fn, Py_NewRef(running_loop));
    Py_XSETREF(current_task_fn, Py_NewRef(current_task));
    Py_RETURN_NONE;
}

static PyMethodDef speedups_methods[] = {
    {"setup", speedups_setup, METH_VARARGS,
     "setup(registry_class, getcurrent, get_running_loop, current_task)"},
    {NULL},
};

static struct PyModuleDef speedups_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "greenscope._speedups",
    .m_doc = "The registry's hit path, compiled (optional; see registry.py).",
    .m_size = -1,
    .m_methods = speedups_methods,
};

PyMODINIT_FUNC
PyInit__speedups(void)
{
    if (PyType_Ready(&FastType) < 0 || PyType_Ready(&HotCallType) < 0
        || PyType_Ready(&HotPropertyType) < 0) {
        return NULL;
    }
    str_registry = PyUnicode_InternFromString("registry");
    str_is_asyncio = PyUnicode_InternFromString("_is_asyncio");
    if (str_registry == NULL || str_is_asyncio == NULL) {
        return NULL;
    }
    PyObject *module = PyModule_Create(&speedups_module);
    if (module == NULL) {
        return NULL;
    }
    if (PyModule_AddObjectRef(module, "Fast", (PyObject *)&FastType) < 0
        || PyModule_AddObjectRef(module, "HotCall", (PyObject *)&HotCallType) < 0
        || PyModule_AddObjectRef(module, "HotProperty", (PyObject *)&HotPropertyType) < 0) {
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
