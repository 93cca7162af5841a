"""A compiled CPU kernel for the common isotropic activation: the tanh profile in float32.

PyTorch computes ``f(z) = tanh(r) / r * z`` over channel groups as a chain of whole-tensor
operations (squares, a sum over the group axis, the scale, a broadcast product; in backward two
more products, a sum and a fused update), each a pass over the activations. This kernel does the
forward in one pass and the backward in one, with every group's scalars in registers, which is what
makes a grouped isotropic transformer FFN cost about what a GELU one does.

The C source below is compiled on first use with the system's C compiler (``$CC``, else ``cc``,
``gcc`` or ``clang``) for this machine's CPU, into a cache directory (``$ISO_LIGHTNING_CACHE``,
else ``$XDG_CACHE_HOME/iso_lightning`` or ``~/.cache/iso_lightning``), keyed by the source, the
compiler and the CPU, so later processes load it in microseconds. It needs no PyTorch headers (the
build takes well under a second) and is called through :mod:`ctypes`, which releases the GIL, so
wide batches are split over ``torch.get_num_threads()`` threads. Without a compiler, on a failed
build, with ``ISO_LIGHTNING_KERNEL=0``, or when the compiled kernel disagrees with PyTorch on a
self-test, the activation uses the PyTorch operations (same results to float round-off).

Layout: ``z`` is viewed as ``(outer, size, inner)``, the channel axis in the middle: one group per
``(outer, inner)`` pair holds ``size`` channels ``inner`` elements apart. That covers one group
over the last axis (``inner = 1``), the blocked layout of grouped FFNs (groups along the last
axis) and one group over the channels of an image (``inner = H * W``).
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from typing import Any, List, Optional, Tuple

import torch
from torch import Tensor

__all__ = ["available", "backward", "forward"]

log = logging.getLogger("iso_lightning")

_SOURCE = r"""
#include <math.h>
#include <stdint.h>
#include <string.h>

/* exp(x) for x <= 0, float32: x = n ln2 + f with |f| <= ln2 / 2, exp(f) by its Taylor series to
   degree 7 (relative error below 1e-8), times 2^n built from the exponent bits. Branch-free, so the
   compiler vectorises the loops that call it. */
static inline float exp_nonpositive(float x) {
    x = x < -87.0f ? -87.0f : x;
    /* Round to nearest by adding and subtracting 1.5 * 2^23 (exact for |n| < 2^22; vectorises). */
    float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
    float f = (x - n * 0.693145751953125f) - n * 1.428606765330187e-06f;
    float p = 1.0f / 5040.0f;
    p = p * f + 1.0f / 720.0f;
    p = p * f + 1.0f / 120.0f;
    p = p * f + 1.0f / 24.0f;
    p = p * f + 1.0f / 6.0f;
    p = p * f + 0.5f;
    p = p * f + 1.0f;
    p = p * f + 1.0f;
    int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

/* s = tanh(r) / r and t = tanh(r) of the squared radius q; below q = 1e-2 their series in q. */
static inline void scale_of(float q, float *s, float *t) {
    float r = sqrtf(q);
    float e = exp_nonpositive(-2.0f * r);
    float tb = (1.0f - e) / (1.0f + e);
    float q2 = q * q;
    float series = 1.0f - q * (1.0f / 3.0f) + q2 * (2.0f / 15.0f) - q2 * q * (17.0f / 315.0f)
                   + q2 * q2 * (62.0f / 2835.0f);
    int small = q < 1e-2f;
    *s = small ? series : tb / (small ? 1.0f : r);
    *t = small ? r * series : tb;
}

/* ds/dq of tanh(r) / r from s, t = tanh(r) and q. */
static inline float slope_of(float q, float s, float t) {
    float q2 = q * q;
    float series = -1.0f / 3.0f + q * (4.0f / 15.0f) - q2 * (51.0f / 315.0f) + q2 * q * (248.0f / 2835.0f);
    return q < 1e-2f ? series : 0.5f * (1.0f - s - t * t) / (q < 1e-2f ? 1.0f : q);
}

/* start + sum_i a_i b_i over n contiguous entries, in eight interleaved partial sums (vectorises). */
static inline float dot(const float *restrict a, const float *restrict b, int64_t n, float start) {
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int k = 0; k < 8; ++k) acc[k] += a[i + k] * b[i + k];
    for (; i < n; ++i) start += a[i] * b[i];
    return start + (((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])));
}

#define CHUNK 1024

/* h = s z per group; s, t, q saved for backward. Returns 1 when a squared radius is not finite
   (the caller then takes the PyTorch route, which handles overflow), else 0. */
int iso_tanh_forward(const float *restrict z, float *restrict h, float *restrict s, float *restrict t,
                     float *restrict q, int64_t outer, int64_t size,
                     int64_t inner, float length) {
    int bad = 0;
    for (int64_t o = 0; o < outer; ++o) {
        const float *zo = z + o * size * inner;
        float *ho = h + o * size * inner;
        if (inner == 1) {
            float qq = dot(zo, zo, size, length);
            float ss, tt;
            scale_of(qq, &ss, &tt);
            bad |= !(qq <= 3.0e38f);
            s[o] = ss; t[o] = tt; q[o] = qq;
            for (int64_t i = 0; i < size; ++i) ho[i] = zo[i] * ss;
            continue;
        }
        for (int64_t g0 = 0; g0 < inner; g0 += CHUNK) {
            int64_t n = inner - g0 < CHUNK ? inner - g0 : CHUNK;
            float *so = s + o * inner + g0, *to = t + o * inner + g0, *qo = q + o * inner + g0;
            for (int64_t g = 0; g < n; ++g) qo[g] = length;
            for (int64_t i = 0; i < size; ++i) {
                const float *row = zo + i * inner + g0;
                for (int64_t g = 0; g < n; ++g) qo[g] += row[g] * row[g];
            }
            for (int64_t g = 0; g < n; ++g) {
                scale_of(qo[g], so + g, to + g);
                bad |= !(qo[g] <= 3.0e38f);
            }
            for (int64_t i = 0; i < size; ++i) {
                const float *row = zo + i * inner + g0;
                float *out = ho + i * inner + g0;
                for (int64_t g = 0; g < n; ++g) out[g] = row[g] * so[g];
            }
        }
    }
    return bad;
}

/* gz = s gh + 2 c z with c = ds/dq (sum_i z_i gh_i + gs) per group; c written to c_out when given. */
void iso_tanh_backward(const float *restrict z, const float *restrict gh, const float *restrict gs,
                       const float *restrict s, const float *restrict t, const float *restrict q,
                       float *restrict gz, float *restrict c_out, int64_t outer, int64_t size, int64_t inner) {
    float c[CHUNK];
    for (int64_t o = 0; o < outer; ++o) {
        const float *zo = z + o * size * inner, *go = gh + o * size * inner;
        float *out = gz + o * size * inner;
        if (inner == 1) {
            float cc = dot(zo, go, size, gs ? gs[o] : 0.0f) * slope_of(q[o], s[o], t[o]);
            if (c_out) c_out[o] = cc;
            float ss = s[o], c2 = 2.0f * cc;
            for (int64_t i = 0; i < size; ++i) out[i] = ss * go[i] + c2 * zo[i];
            continue;
        }
        for (int64_t g0 = 0; g0 < inner; g0 += CHUNK) {
            int64_t n = inner - g0 < CHUNK ? inner - g0 : CHUNK;
            const float *so = s + o * inner + g0, *to = t + o * inner + g0, *qo = q + o * inner + g0;
            for (int64_t g = 0; g < n; ++g) c[g] = gs ? gs[o * inner + g0 + g] : 0.0f;
            for (int64_t i = 0; i < size; ++i) {
                const float *zr = zo + i * inner + g0, *gr = go + i * inner + g0;
                for (int64_t g = 0; g < n; ++g) c[g] += zr[g] * gr[g];
            }
            for (int64_t g = 0; g < n; ++g) {
                c[g] *= slope_of(qo[g], so[g], to[g]);
                if (c_out) c_out[o * inner + g0 + g] = c[g];
                c[g] *= 2.0f;
            }
            for (int64_t i = 0; i < size; ++i) {
                const float *zr = zo + i * inner + g0, *gr = go + i * inner + g0;
                float *dst = out + i * inner + g0;
                for (int64_t g = 0; g < n; ++g) dst[g] = so[g] * gr[g] + c[g] * zr[g];
            }
        }
    }
}
"""

# -fno-math-errno lets sqrtf vectorise (errno is never read); no -ffast-math: the sums keep their order.
_FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-std=c99", "-fPIC", "-shared"]
#: Below this many elements a call runs on the calling thread (splitting costs more than it saves).
PARALLEL_ELEMENTS = 1 << 16

_lock = threading.Lock()
_state: dict = {}  # "lib": the loaded library or None once looked up; "pool", "pool_key": the threads
_UNSET = object()


def _compiler() -> Optional[str]:
    for name in ([os.environ["CC"]] if os.environ.get("CC") else []) + ["cc", "gcc", "clang"]:
        path = shutil.which(name)
        if path:
            return path
    return None


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return f"{platform.machine()} {platform.processor()}"


def _cache_dir() -> str:
    root = os.environ.get("ISO_LIGHTNING_CACHE")
    if not root:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(base, "iso_lightning")
    return root


def _build() -> Tuple[Optional[ctypes.CDLL], str]:
    if os.environ.get("ISO_LIGHTNING_KERNEL", "1").strip().lower() in ("0", "false", "no", "off"):
        return None, "disabled by ISO_LIGHTNING_KERNEL"
    compiler = _compiler()
    if compiler is None:
        return None, "no C compiler found (set CC)"
    key = hashlib.sha256("\0".join([_SOURCE, compiler, " ".join(_FLAGS), _cpu()]).encode()).hexdigest()[:20]
    directory = _cache_dir()
    path = os.path.join(directory, f"isotropic_{key}.so")
    if not os.path.exists(path):
        try:
            os.makedirs(directory, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=directory) as tmp:
                source = os.path.join(tmp, "isotropic.c")
                with open(source, "w") as fh:
                    fh.write(_SOURCE)
                target = os.path.join(tmp, "isotropic.so")
                done = subprocess.run([compiler, *_FLAGS, "-o", target, source, "-lm"], capture_output=True,
                                      text=True, timeout=120, stdin=subprocess.DEVNULL)
                if done.returncode != 0:
                    return None, f"the build failed: {done.stderr.strip()[-300:]}"
                os.replace(target, path)  # atomic: another process never loads a half-written file
        except (OSError, subprocess.SubprocessError) as err:
            return None, f"the build failed: {err}"
    try:
        lib = ctypes.CDLL(path)
    except OSError as err:
        return None, f"loading {path} failed: {err}"
    p, i = ctypes.c_void_p, ctypes.c_int64
    lib.iso_tanh_forward.argtypes = [p, p, p, p, p, i, i, i, ctypes.c_float]
    lib.iso_tanh_forward.restype = ctypes.c_int
    lib.iso_tanh_backward.argtypes = [p, p, p, p, p, p, p, p, i, i, i]
    lib.iso_tanh_backward.restype = None
    return lib, path


def _library() -> Optional[ctypes.CDLL]:
    with _lock:
        if "lib" not in _state:
            lib, where = _build()
            _state["lib"] = lib
            if lib is not None and not _self_test(lib):
                _state["lib"], where = None, "its results disagree with PyTorch's on a self-test"
            if _state["lib"] is None:
                log.info(f"[iso_lightning] compiled isotropic kernel unavailable ({where}); using PyTorch operations")
        return _state["lib"]  # type: ignore[no-any-return]


def reset() -> None:
    """Forget the loaded kernel, so that the next call looks again (after changing the environment)."""
    with _lock:
        _drop_pool()
        _state.clear()


def available() -> bool:
    """Whether the compiled kernel is in use (building it on the first call)."""
    return _library() is not None


def _drop_pool() -> None:
    # A pool made in this process (one inherited through a fork has no threads here to end).
    pool = _state.pop("pool", None)
    if pool is not None and _state.pop("pool_key")[0] == os.getpid():
        pool.shutdown(wait=False)


def _pool(workers: int) -> concurrent.futures.ThreadPoolExecutor:
    pool = _state.get("pool")
    if pool is None or _state.get("pool_key") != (os.getpid(), workers):  # not across a fork
        _drop_pool()  # another thread count: the old pool's idle threads end
        pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="iso_lightning")
        _state.update(pool=pool, pool_key=(os.getpid(), workers))
    return pool  # type: ignore[no-any-return]


def _split(outer: int, elements: int) -> List[Tuple[int, int]]:
    workers = torch.get_num_threads()
    if workers <= 1 or elements < PARALLEL_ELEMENTS or outer < 2:
        return [(0, outer)]
    parts = min(workers, outer)
    bounds = [outer * k // parts for k in range(parts + 1)]
    return [(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]


def _run(calls: List[Any]) -> List[Any]:
    if len(calls) == 1:
        return [calls[0]()]
    futures = [_pool(len(calls)).submit(call) for call in calls]
    return [f.result() for f in futures]


def _ptr(t: Optional[Tensor], offset: int = 0) -> Optional[int]:
    return None if t is None else t.data_ptr() + 4 * offset


def forward(z: Tensor, outer: int, size: int, inner: int, length: float
            ) -> Optional[Tuple[Tensor, Tensor, Tensor, Tensor]]:
    """``(h, s, t, q)`` of contiguous float32 CPU ``z`` (``s``, ``t``, ``q`` of shape ``(outer, inner)``),
    or ``None`` when the kernel is unavailable or a squared radius is not finite."""
    lib = _state.get("lib", _UNSET)  # no lock once looked up: this runs at every forward pass
    if lib is _UNSET:
        lib = _library()
    return None if lib is None else _forward(lib, z, outer, size, inner, length)


def backward(z: Tensor, grad_h: Tensor, grad_s: Optional[Tensor], s: Tensor, t: Tensor, q: Tensor, outer: int,
             size: int, inner: int, want_c: bool) -> Tuple[Tensor, Optional[Tensor]]:
    """``dL/dz`` (and ``c = ds/dq * (<z, dL/dh> + dL/ds)`` per group when ``want_c``) for :func:`forward`'s
    saved tensors; ``grad_h`` and ``grad_s`` contiguous."""
    return _backward(_state["lib"], z, grad_h, grad_s, s, t, q, outer, size, inner, want_c)


def _forward(lib: ctypes.CDLL, z: Tensor, outer: int, size: int, inner: int, length: float
             ) -> Optional[Tuple[Tensor, Tensor, Tensor, Tensor]]:
    h = torch.empty_like(z)
    s, t, q = (z.new_empty((outer, inner)) for _ in range(3))
    per = size * inner
    calls = [lambda a=a, b=b: lib.iso_tanh_forward(_ptr(z, a * per), _ptr(h, a * per), _ptr(s, a * inner),
                                                    _ptr(t, a * inner), _ptr(q, a * inner), b - a, size, inner,
                                                    length)
             for a, b in _split(outer, z.numel())]
    if any(_run(calls)):
        return None
    return h, s, t, q


def _backward(lib: ctypes.CDLL, z: Tensor, grad_h: Tensor, grad_s: Optional[Tensor], s: Tensor, t: Tensor,
              q: Tensor, outer: int, size: int, inner: int, want_c: bool) -> Tuple[Tensor, Optional[Tensor]]:
    grad_z = torch.empty_like(z)
    c = z.new_empty((outer, inner)) if want_c else None
    per = size * inner
    calls = [lambda a=a, b=b: lib.iso_tanh_backward(
        _ptr(z, a * per), _ptr(grad_h, a * per), _ptr(grad_s, a * inner), _ptr(s, a * inner), _ptr(t, a * inner),
        _ptr(q, a * inner), _ptr(grad_z, a * per), _ptr(c, a * inner), b - a, size, inner)
        for a, b in _split(outer, z.numel())]
    _run(calls)
    return grad_z, c


def _self_test(lib: ctypes.CDLL) -> bool:
    """The kernel against the PyTorch formula in float64, on both layouts and both series branches."""
    g = torch.Generator().manual_seed(0)
    for outer, size, inner, scale in ((5, 19, 1, 0.7), (4, 8, 37, 0.9), (3, 6, 5, 0.01)):
        z = (torch.randn(outer, size, inner, generator=g) * scale).contiguous()
        gh = torch.randn(outer, size, inner, generator=g)
        gs = torch.randn(outer, inner, generator=g)
        done = _forward(lib, z, outer, size, inner, 0.25)
        if done is None:
            return False
        h, s, t, q = done
        gz, _ = _backward(lib, z, gh, gs, s, t, q, outer, size, inner, want_c=True)
        with torch.enable_grad():  # the first call comes from inside an autograd function's forward
            zd = z.double().requires_grad_()
            qd = (zd * zd).sum(1, keepdim=True) + 0.25
            sd = torch.tanh(qd.sqrt()) / qd.sqrt()
            hd = zd * sd
            (hd * gh.double()).sum().add((sd.squeeze(1) * gs.double()).sum()).backward()
        assert zd.grad is not None
        for got, want in ((h, hd), (s, sd.squeeze(1)), (gz, zd.grad)):
            if not torch.allclose(got.double(), want.detach(), rtol=3e-6, atol=1e-6):
                return False
    return True
