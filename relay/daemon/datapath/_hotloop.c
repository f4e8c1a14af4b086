/* The threaded data path's inner loops in C (relay/daemon/datapath/threaded.py is the
 * pure-Python twin, used where this module is not built, and by the conformance suite).
 *
 * Each function runs one direction of a stream with the GIL released, until its source
 * ends, its wake fires, or its byte budget (a rekey threshold) is used up, so a message
 * costs its syscalls and no Python. The sockets are non-blocking (trio owns them): a call
 * that would block waits in poll(2) on its socket and on the direction's wake eventfd.
 *
 * OpenSSL is not linked here: SSL_read, SSL_write, SSL_get_error and ERR_clear_error are
 * the addresses of the functions pyOpenSSL itself calls (its cffi binding), handed over by
 * init(), so the SSL objects are always driven by the library that made them.
 *
 * Lock is a pthread mutex usable from Python as a context manager: TlsConn holds it around
 * every OpenSSL call, from trio or from either direction's thread, C or Python.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h> /* defines _GNU_SOURCE: splice(2) */

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <pthread.h>
#include <stdint.h>
#include <sys/socket.h>
#include <unistd.h>

/* outcomes of a run, as threaded.py names them */
enum { R_EOF = 1, R_STOP = 2, R_CHAIN = 3, R_TLS = 4, R_OS = -1 };

/* OpenSSL's SSL_get_error codes (stable ABI values) */
enum { E_SSL = 1, E_WANT_READ = 2, E_WANT_WRITE = 3, E_SYSCALL = 5, E_ZERO_RETURN = 6 };

#define RECORD_BYTES 16384
/* hotloop.py refuses a build whose ABI differs (a stale .so beside newer Python code) */
#define HOTLOOP_ABI 3

typedef int (*ssl_io_fn)(void *ssl, void *buf, int num);
typedef int (*ssl_error_fn)(const void *ssl, int ret);
typedef void (*err_clear_fn)(void);

static ssl_io_fn f_read, f_write;
static ssl_error_fn f_get_error;
static err_clear_fn f_clear;

/* --- Lock ------------------------------------------------------------------------- */

typedef struct {
    PyObject_HEAD
    pthread_mutex_t mu;
} LockObject;

static PyObject *lock_new(PyTypeObject *type, PyObject *args, PyObject *kw) {
    if (PyTuple_GET_SIZE(args) || (kw && PyDict_GET_SIZE(kw))) {
        PyErr_SetString(PyExc_TypeError, "Lock() takes no arguments");
        return NULL;
    }
    LockObject *self = (LockObject *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    pthread_mutexattr_t attr;
    pthread_mutexattr_init(&attr);
    pthread_mutexattr_settype(&attr, PTHREAD_MUTEX_ERRORCHECK); /* a misuse is an error, not UB */
    int rc = pthread_mutex_init(&self->mu, &attr);
    pthread_mutexattr_destroy(&attr);
    if (rc != 0) {
        Py_DECREF(self);
        errno = rc;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    return (PyObject *)self;
}

static void lock_dealloc(LockObject *self) {
    pthread_mutex_destroy(&self->mu);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *lock_enter(LockObject *self, PyObject *unused) {
    int rc = pthread_mutex_trylock(&self->mu);
    if (rc == EBUSY) {
        /* held by a thread in C for one OpenSSL call: wait without the GIL */
        Py_BEGIN_ALLOW_THREADS
        rc = pthread_mutex_lock(&self->mu);
        Py_END_ALLOW_THREADS
    }
    if (rc != 0) {
        PyErr_SetString(PyExc_RuntimeError, rc == EDEADLK ? "Lock is already held by this thread" : "Lock failed");
        return NULL;
    }
    Py_RETURN_TRUE;
}

static PyObject *lock_exit(LockObject *self, PyObject *args) {
    if (pthread_mutex_unlock(&self->mu) != 0) {
        PyErr_SetString(PyExc_RuntimeError, "release of a Lock this thread does not hold");
        return NULL;
    }
    Py_RETURN_FALSE;
}

static PyMethodDef lock_methods[] = {
    {"__enter__", (PyCFunction)lock_enter, METH_NOARGS, "Take the lock (waiting without the GIL)."},
    {"__exit__", (PyCFunction)lock_exit, METH_VARARGS, "Give the lock back."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject LockType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "relay.daemon.datapath._hotloop.Lock",
    .tp_basicsize = sizeof(LockObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "A mutex around one SSL object's calls, shared by Python and the C loops.",
    .tp_new = lock_new,
    .tp_dealloc = (destructor)lock_dealloc,
    .tp_methods = lock_methods,
};

/* --- what every loop shares ------------------------------------------------------------ */

typedef struct {
    int wake_fd;
    unsigned char *flags; /* [0] stopped, [1] poked: threaded.Wake writes them, then the eventfd */
    int64_t *counter;     /* the Meter's live count, read by a scrape at any time */
    Py_ssize_t budget;    /* bytes after which the run hands back to trio (a rekey threshold) */
    Py_ssize_t moved;
    int sys_errno;
} Run;

static int stopped(Run *r) { return __atomic_load_n(&r->flags[0], __ATOMIC_ACQUIRE) != 0; }

static int take_poke(Run *r) { return __atomic_exchange_n(&r->flags[1], 0, __ATOMIC_ACQ_REL) != 0; }

/* 0 once fd may be ready (POLLERR/POLLHUP count: the retried call reports them), else an outcome */
static int wait_on(Run *r, int fd, short events, int pokable) {
    struct pollfd p[2] = {{fd, events, 0}, {r->wake_fd, POLLIN, 0}};
    for (;;) {
        if (stopped(r))
            return R_STOP;
        if (pokable && take_poke(r))
            return R_CHAIN;
        if (poll(p, 2, -1) < 0) {
            if (errno == EINTR)
                continue;
            r->sys_errno = errno;
            return R_OS;
        }
        if (p[0].revents)
            return 0;
        uint64_t drained;
        if (read(r->wake_fd, &drained, sizeof drained) < 0 && errno != EAGAIN && errno != EINTR) {
            r->sys_errno = errno;
            return R_OS;
        }
    }
}

static void count(Run *r, Py_ssize_t n) {
    __atomic_fetch_add(r->counter, (int64_t)n, __ATOMIC_RELAXED);
    r->moved += n;
}

static int send_all(Run *r, int fd, const char *p, size_t n) {
    while (n) {
        ssize_t sent = send(fd, p, n, MSG_NOSIGNAL);
        if (sent < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN) {
                int w = wait_on(r, fd, POLLOUT, 0);
                if (w)
                    return w;
                continue;
            }
            r->sys_errno = errno;
            return R_OS;
        }
        p += sent;
        n -= (size_t)sent;
    }
    return 0;
}

typedef struct {
    void *ssl;
    pthread_mutex_t *mu;
    int fd;
    int ret; /* the failed call's return value and SSL_get_error, for the Python side */
    int err;
} Tls;

/* one OpenSSL call under the lock: > 0 bytes, else t->err says why */
static int tls_call(Tls *t, ssl_io_fn fn, void *buf, Py_ssize_t len, Run *r) {
    int num = len > INT_MAX ? INT_MAX : (int)len;
    pthread_mutex_lock(t->mu);
    f_clear(); /* SSL_get_error reads the queue: only this call's entries may be in it */
    errno = 0;
    int n = fn(t->ssl, buf, num);
    if (n <= 0) {
        t->ret = n;
        t->err = f_get_error(t->ssl, n);
        r->sys_errno = errno;
    }
    pthread_mutex_unlock(t->mu);
    return n;
}

/* after a WANT_*: wait for what OpenSSL asked; any other failure ends the run */
static int tls_wait(Run *r, Tls *t) {
    if (t->err == E_WANT_READ)
        return wait_on(r, t->fd, POLLIN, 0);
    if (t->err == E_WANT_WRITE)
        return wait_on(r, t->fd, POLLOUT, 0);
    if (t->err == E_ZERO_RETURN)
        return R_EOF;
    return R_TLS;
}

/* --- the loops ------------------------------------------------------------------------ */

static int run_splice(Run *r, int src, int dst, int pipe_r, int pipe_w, size_t pipe_size) {
    const unsigned flags = SPLICE_F_MOVE | SPLICE_F_NONBLOCK;
    size_t in_pipe = 0;
    int eof = 0, empty = 0;
    for (;;) {
        if (stopped(r))
            return R_STOP;
        int moved = 0;
        if (!eof && in_pipe < pipe_size && !empty) {
            ssize_t n = splice(src, NULL, pipe_w, NULL, pipe_size - in_pipe, flags);
            if (n < 0 && errno != EAGAIN && errno != EINTR) {
                r->sys_errno = errno;
                return R_OS;
            }
            if (n < 0) {
                empty = errno == EAGAIN;
            } else {
                eof = n == 0;
                empty = n > 0 && (size_t)n < pipe_size - in_pipe;
                in_pipe += (size_t)n;
                moved = 1;
            }
        }
        if (in_pipe) {
            ssize_t n = splice(pipe_r, NULL, dst, NULL, in_pipe, flags);
            if (n < 0 && errno != EAGAIN && errno != EINTR) {
                r->sys_errno = errno;
                return R_OS;
            }
            if (n > 0) {
                in_pipe -= (size_t)n;
                count(r, n);
                moved = 1;
            }
        }
        if (eof && !in_pipe)
            return R_EOF;
        if (moved && !(empty && !in_pipe))
            continue;
        /* nothing moved, or only a short read went through: wait on the socket that blocks */
        int w = in_pipe ? wait_on(r, dst, POLLOUT, 0) : wait_on(r, src, POLLIN, 0);
        if (w)
            return w;
        if (!in_pipe)
            empty = 0;
    }
}

/* TLS -> plaintext, whole records at a time; *short_read: the last run ended on a short record */
static int run_from_tls(Run *r, Tls *t, int dst, char *buf, Py_ssize_t len, int *short_read) {
    for (;;) {
        if (stopped(r))
            return R_STOP;
        if (*short_read) {
            /* OpenSSL (no read-ahead) handed the short record over whole: nothing is buffered */
            int w = wait_on(r, t->fd, POLLIN, 0);
            if (w)
                return w;
        }
        Py_ssize_t got;
        for (;;) {
            int n = tls_call(t, f_read, buf, len, r);
            if (n > 0) {
                got = n;
                break;
            }
            int w = tls_wait(r, t);
            if (w)
                return w;
        }
        int failed = 0; /* a record after the ones read failed: pass those on, then report it */
        while (got < len && got % RECORD_BYTES == 0) {
            int n = tls_call(t, f_read, buf + got, len - got, r);
            if (n <= 0) {
                /* nothing more now (the next read waits, or reads the end), or a failure whose
                   reasons stay in this thread's error queue for the Python side */
                failed = t->err != E_WANT_READ && t->err != E_WANT_WRITE && t->err != E_ZERO_RETURN;
                break;
            }
            got += n;
        }
        *short_read = got % RECORD_BYTES != 0;
        int s = send_all(r, dst, buf, (size_t)got);
        if (s)
            return s;
        count(r, got);
        if (failed)
            return R_TLS;
        if (r->moved >= r->budget)
            return R_CHAIN;
    }
}

/* plaintext -> TLS; `pokable`: a poke (a connection joined the chain) hands back to trio */
static int run_to_tls(Run *r, int src, Tls *t, char *buf, Py_ssize_t len, int pokable) {
    int empty = 0;
    for (;;) {
        if (stopped(r))
            return R_STOP;
        if (pokable && take_poke(r))
            return R_CHAIN;
        if (empty) {
            int w = wait_on(r, src, POLLIN, pokable);
            if (w)
                return w;
        }
        ssize_t n = recv(src, buf, (size_t)len, 0);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN) {
                empty = 1;
                continue;
            }
            r->sys_errno = errno;
            return R_OS;
        }
        if (n == 0)
            return R_EOF;
        empty = n < len;
        /* after a WANT_*, the same pointer and length again: OpenSSL resumes the write */
        for (Py_ssize_t off = 0; off < n;) {
            int k = tls_call(t, f_write, buf + off, n - off, r);
            if (k > 0) {
                off += k;
                continue;
            }
            int w = tls_wait(r, t);
            if (w == R_EOF)
                w = R_TLS; /* close_notify while writing: the write failed */
            if (w)
                return w;
        }
        count(r, n);
        if (r->moved >= r->budget)
            return R_CHAIN;
    }
}

/* --- the Python side -------------------------------------------------------------------- */

static int get_run(Run *r, int wake_fd, Py_buffer *flags, Py_buffer *counter, Py_ssize_t budget) {
    if (flags->len < 2 || counter->len < (Py_ssize_t)sizeof(int64_t) ||
        ((uintptr_t)counter->buf % sizeof(int64_t)) != 0) {
        PyErr_SetString(PyExc_ValueError, "flags: 2 bytes; counter: one aligned int64");
        return -1;
    }
    r->wake_fd = wake_fd;
    r->flags = flags->buf;
    r->counter = counter->buf;
    r->budget = budget < 1 ? 1 : budget;
    r->moved = 0;
    r->sys_errno = 0;
    return 0;
}

static int ready(void) {
    if (f_read == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "_hotloop.init() has not been called");
        return 0;
    }
    return 1;
}

static PyObject *outcome(int o, Run *r, Tls *t, int short_read) {
    if (o == R_OS) {
        errno = r->sys_errno;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    return Py_BuildValue("(innnii)", o, r->moved, (Py_ssize_t)(t ? t->ret : 0), (Py_ssize_t)(t ? t->err : 0),
                         r->sys_errno, short_read);
}

static PyObject *py_init(PyObject *self, PyObject *args) {
    unsigned long long rd, wr, ge, cl;
    if (!PyArg_ParseTuple(args, "KKKK", &rd, &wr, &ge, &cl))
        return NULL;
    if (!rd || !wr || !ge || !cl) {
        PyErr_SetString(PyExc_ValueError, "a null function address");
        return NULL;
    }
    f_read = (ssl_io_fn)(uintptr_t)rd;
    f_write = (ssl_io_fn)(uintptr_t)wr;
    f_get_error = (ssl_error_fn)(uintptr_t)ge;
    f_clear = (err_clear_fn)(uintptr_t)cl;
    Py_RETURN_NONE;
}

static PyObject *py_splice(PyObject *self, PyObject *args) {
    int src, dst, pipe_r, pipe_w, wake_fd;
    Py_ssize_t pipe_size;
    Py_buffer flags, counter;
    if (!PyArg_ParseTuple(args, "iiiiniw*w*", &src, &dst, &pipe_r, &pipe_w, &pipe_size, &wake_fd, &flags, &counter))
        return NULL;
    Run r;
    PyObject *res = NULL;
    if (get_run(&r, wake_fd, &flags, &counter, PY_SSIZE_T_MAX) == 0) {
        int o;
        Py_BEGIN_ALLOW_THREADS
        o = run_splice(&r, src, dst, pipe_r, pipe_w, (size_t)pipe_size);
        Py_END_ALLOW_THREADS
        res = outcome(o, &r, NULL, 0);
    }
    PyBuffer_Release(&flags);
    PyBuffer_Release(&counter);
    return res;
}

/* from_tls and to_tls: the same arguments, the plaintext fd first; `flag` is short_read
   (TLS -> plaintext, returned updated) or pokable (plaintext -> TLS) */
static PyObject *tls_run(PyObject *args, int from_tls) {
    unsigned long long ssl;
    LockObject *lock;
    int plain, ssl_fd, wake_fd, flag;
    Py_ssize_t budget;
    Py_buffer flags, counter, buf;
    if (!PyArg_ParseTuple(args, "iKO!iiw*w*w*np", &plain, &ssl, &LockType, &lock, &ssl_fd, &wake_fd, &flags, &counter,
                          &buf, &budget, &flag))
        return NULL;
    Run r;
    PyObject *res = NULL;
    if (ready() && get_run(&r, wake_fd, &flags, &counter, budget) == 0) {
        Tls t = {(void *)(uintptr_t)ssl, &lock->mu, ssl_fd, 0, 0};
        int o;
        Py_BEGIN_ALLOW_THREADS
        o = from_tls ? run_from_tls(&r, &t, plain, buf.buf, buf.len, &flag)
                     : run_to_tls(&r, plain, &t, buf.buf, buf.len, flag);
        Py_END_ALLOW_THREADS
        res = outcome(o, &r, &t, from_tls ? flag : 0);
    }
    PyBuffer_Release(&flags);
    PyBuffer_Release(&counter);
    PyBuffer_Release(&buf);
    return res;
}

static PyObject *py_from_tls(PyObject *self, PyObject *args) { return tls_run(args, 1); }

static PyObject *py_to_tls(PyObject *self, PyObject *args) { return tls_run(args, 0); }

static PyMethodDef methods[] = {
    {"init", py_init, METH_VARARGS, "init(SSL_read, SSL_write, SSL_get_error, ERR_clear_error): their addresses."},
    {"splice", py_splice, METH_VARARGS,
     "splice(src, dst, pipe_r, pipe_w, pipe_size, wake_fd, flags, counter) -> outcome tuple"},
    {"from_tls", py_from_tls, METH_VARARGS,
     "from_tls(dst, ssl, lock, ssl_fd, wake_fd, flags, counter, buf, budget, short_read) -> outcome tuple"},
    {"to_tls", py_to_tls, METH_VARARGS,
     "to_tls(src, ssl, lock, ssl_fd, wake_fd, flags, counter, buf, budget, pokable) -> outcome tuple"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "_hotloop",
    .m_doc = "The threaded data path's inner loops, in C.",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC PyInit__hotloop(void) {
    if (PyType_Ready(&LockType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddType(m, &LockType) < 0 || PyModule_AddIntConstant(m, "ABI", HOTLOOP_ABI) < 0 ||
        PyModule_AddIntConstant(m, "EOF", R_EOF) < 0 ||
        PyModule_AddIntConstant(m, "STOP", R_STOP) < 0 || PyModule_AddIntConstant(m, "CHAIN", R_CHAIN) < 0 ||
        PyModule_AddIntConstant(m, "TLS", R_TLS) < 0 || PyModule_AddIntConstant(m, "SSL_ERROR_SYSCALL", E_SYSCALL) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
