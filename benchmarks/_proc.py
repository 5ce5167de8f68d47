"""What both benchmarks read from Linux's /proc: the CPU's name and the process's resident-set counters."""
import platform


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo (platform.processor() where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor()


# CPU features that change which kernels oneDNN and torch run (bfloat16 above all: without avx512_bf16 or
# amx_bf16 its products are emulated, 20x slower than float32 on a 2-core AVX2 EPYC).
VECTOR_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")


def cpu_vector_flags() -> list:
    """Which of VECTOR_FLAGS /proc/cpuinfo lists ([] where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next(line.split(":", 1)[1].split() for line in f if line.startswith("flags"))
    except (OSError, StopIteration):
        return []
    return [flag for flag in VECTOR_FLAGS if flag in flags]


def status_kib(field: str) -> int:
    """A KiB field of /proc/self/status, e.g. "VmRSS" (resident set) or "VmHWM" (its peak)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak_rss() -> None:
    """Reset the peak resident set (VmHWM) to the current one; OSError where the kernel does not allow it."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
