"""Compiles ``kernels.cpp`` on first use and loads it with ctypes.

The kernels are built for the machine they run on (``-march=native``) by the system C++
compiler (``$CXX``, default ``c++``). The source includes no torch header and needs no C++
runtime, so a build does not depend on how torch was built. It is compiled into one library per
storage type (float32, float64, bfloat16), on the first use of that type: a float32 model waits
for the float32 compilation alone, about half of the time that the three took side by side on
two cores (BENCHMARKS.md). Each library is cached in ``$XDG_CACHE_HOME/involution`` (default
``~/.cache/involution``) under a name that hashes the source, the flags, the compiler's name and
the CPU: a new source, compiler or machine gets its own build, and later processes load the
cached file in milliseconds (without needing the compiler).

Why not a torch C++ extension: compiling against torch's headers takes about a minute on two
cores and needs ninja, and torch as a build requirement would make pip's isolated build fetch a
second (CUDA) torch. Kernels that inductor generated from one expression per pass were 3x
slower, and took 31-54 s to compile (BENCHMARKS.md).

Threads come from OpenMP (``-fopenmp``). Where torch's runtime is ``libgomp.so.1`` (the x86-64
Linux wheels), the library, linked by that soname, shares it, so its parallel regions run on
torch's own threads. A compiler that fails with ``-fopenmp`` builds without it (cached under
another name), and the kernels then run on one thread; each process that loads them says so in
one warning.

When the compiler is missing or fails, :func:`library` raises :class:`BuildError` saying why; a
process logs its first failure as one warning, and dispatch falls back to the portable backend.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import os
import platform
import shlex
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

logger = logging.getLogger(__name__)

SOURCE = "kernels.cpp"
FLAGS = (
    "-O3",
    "-march=native",
    # Fused multiply-adds: GCC contracts by default only in its GNU modes; stated for any compiler.
    "-ffp-contract=fast",
    "-std=gnu++17",
    "-fno-exceptions",
    "-fno-rtti",
    "-fPIC",
    # GCC notes that 64-byte vector arguments changed ABI in GCC 4.6: internal functions only.
    "-Wno-psabi",
)
# Threads (see the module docstring); left out where the compiler fails with it.
OPENMP = ("-fopenmp",)
ENTRY_POINTS = (
    "involution_forward",
    "involution_grad_input",
    "involution_grad_kernel",
    "involution_fused_forward",
    "involution_fused_grad_input",
    "involution_fused_grad_features",
)
# The storage types, one library each (kernels.cpp's INVOLUTION_DTYPE codes, in order): an
# entry point of a library is named by symbol().
DTYPES = ("float32", "float64", "bfloat16")


def storage_flag(type_name: str) -> str:
    """The compiler flag that builds the library of storage type ``type_name`` (of DTYPES)."""
    return f"-DINVOLUTION_DTYPE={DTYPES.index(type_name)}"


def symbol(entry: str, type_name: str) -> str:
    """The library's name for entry point ``entry`` (of ENTRY_POINTS) of one storage type."""
    return f"{entry}_{type_name}"


# A build that has not finished by then has failed: the first call must not hang.
_BUILD_TIMEOUT_S = 120


class BuildError(RuntimeError):
    """The CPU kernels could not be compiled or loaded; the message says why."""


class _BuildTimeout(BuildError):
    """The compiler did not finish in time (a second build could hang as long again)."""


def cache_dir() -> Path:
    """Where built libraries are kept: ``$XDG_CACHE_HOME/involution`` or ``~/.cache/involution``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "involution"


def _cpu_identity() -> str:
    """What ``-march=native`` depends on: the CPU's model and feature flags, where Linux says."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return "".join(sorted({line for line in f if line.startswith(("model name", "flags"))}))
    except OSError:
        return f"{platform.machine()} {platform.processor()}"


def _compiler() -> list[str]:
    return shlex.split(os.environ.get("CXX") or "c++")


def _target(source: bytes, compiler: list[str], flags: tuple[str, ...]) -> Path:
    key = hashlib.sha256()
    for part in (source, " ".join(flags).encode(), shlex.join(compiler).encode()):
        key.update(part + b"\0")
    key.update(_cpu_identity().encode())
    return cache_dir() / f"cpu_kernels-{key.hexdigest()[:16]}.so"


@contextlib.contextmanager
def _exclusive(path: Path) -> Iterator[None]:
    """Holds a lock file, so that processes starting together build once (POSIX only)."""
    try:
        import fcntl
    except ImportError:  # Windows: concurrent builds each write their own file; one rename wins
        yield
        return
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _compile(compiler: list[str], flags: tuple[str, ...], source: Path, target: Path) -> None:
    """Builds ``target`` through a temporary file and an atomic rename."""
    fd, tmp = tempfile.mkstemp(suffix=".so", prefix=target.stem + ".", dir=target.parent)
    os.close(fd)
    try:
        _run([*compiler, *flags, "-shared", str(source), "-o", tmp], _BUILD_TIMEOUT_S)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _run(command: list[str], timeout_s: float) -> None:
    """Runs ``command``. Raises BuildError when it fails (with its first error line), or when it
    has not finished in ``timeout_s``: then it is stopped, with the processes it started (the
    compiler driver's own)."""
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            raise _BuildTimeout(f"{command[0]} took longer than {timeout_s} s") from None
        finally:
            if process.returncode is None:
                if hasattr(os, "killpg"):  # POSIX: the session started for it
                    os.killpg(process.pid, signal.SIGKILL)
                else:
                    process.kill()
                process.wait()
        if process.returncode != 0:
            log.seek(0)
            lines = log.read().decode(errors="replace").strip().splitlines() or ["no output"]
            first_error = next((line for line in lines if "error" in line), lines[0])
            raise BuildError(
                f"{shlex.join(command)} exited with {process.returncode}: {first_error}"
            )


def _load(path: Path, type_name: str) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    for name in ENTRY_POINTS:
        fn = getattr(lib, symbol(name, type_name))
        # (problem, fused operands or null, rows, rows per unit, threads)
        fn.argtypes = [
            ctypes.c_void_p,
            ctypes.c_void_p,
            ctypes.c_int64,
            ctypes.c_int64,
            ctypes.c_int,
        ]
        fn.restype = ctypes.c_int
    return lib


def _build_and_load(type_name: str) -> ctypes.CDLL:
    global _warned_no_openmp
    compiler = _compiler()
    flags = (*FLAGS, storage_flag(type_name))
    with resources.as_file(resources.files(__package__) / SOURCE) as source:
        try:
            return _built(compiler, (*flags, *OPENMP), source, type_name)
        except BuildError as error:
            if isinstance(error, _BuildTimeout):
                raise
            library = _built(compiler, flags, source, type_name)
            if not _warned_no_openmp:
                _warned_no_openmp = True
                logger.warning(
                    "involution: CPU kernels built without OpenMP, so they run on one thread: %s",
                    error,
                )
            return library


def _built(
    compiler: list[str], flags: tuple[str, ...], source: Path, type_name: str
) -> ctypes.CDLL:
    """The ``type_name`` library built from ``source`` with ``flags``: from the cache, or compiled
    now."""
    target = _target(source.read_bytes(), compiler, flags)
    if not target.exists():
        if not compiler or shutil.which(compiler[0]) is None:
            name = compiler[0] if compiler else ""
            raise BuildError(f"C++ compiler {name!r} not found (set CXX to one)")
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            with _exclusive(target.with_suffix(".lock")):
                if not target.exists():
                    start = time.perf_counter()
                    _compile(compiler, flags, source, target)
                    logger.info(
                        "involution: built the %s CPU kernels in %.1f s: %s",
                        type_name,
                        time.perf_counter() - start,
                        target,
                    )
        except OSError as error:
            raise BuildError(f"cannot build in {target.parent}: {error}") from error
    try:
        return _load(target, type_name)
    except (OSError, AttributeError) as error:
        raise BuildError(f"cannot load {target}: {error}") from error


# Each storage type's library, or why it could not be built, once its first use has asked.
_loaded: dict[str, ctypes.CDLL | BuildError] = {}
_lock = threading.Lock()
# Whether this process has said that the kernels are unavailable, or that they run on one thread.
_warned_unavailable = False
_warned_no_openmp = False


def library(type_name: str) -> ctypes.CDLL:
    """The loaded kernels of storage type ``type_name`` (one of DTYPES); the first call for a
    type builds them, or loads them from the cache.

    The outcome is kept for the process: a failure is raised again on later calls without
    another attempt. The process's first failure is logged as one warning.

    Raises:
        ValueError: ``type_name`` is not one of DTYPES.
        BuildError: no compiler, a failed compilation, or a library that does not load.
    """
    global _warned_unavailable
    if type_name not in DTYPES:
        raise ValueError(f"type_name ({type_name!r}) must be one of {', '.join(DTYPES)}")
    if type_name not in _loaded:
        with _lock:
            if type_name not in _loaded:
                try:
                    _loaded[type_name] = _build_and_load(type_name)
                except BuildError as error:
                    if not _warned_unavailable:
                        _warned_unavailable = True
                        logger.warning(
                            "involution: CPU kernels unavailable, using the portable backend: %s",
                            error,
                        )
                    _loaded[type_name] = error
    loaded = _loaded[type_name]
    if isinstance(loaded, BuildError):
        raise loaded
    return loaded
