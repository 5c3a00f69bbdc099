"""The machine a benchmark ran on, for its report (no TensorFlow import: shared by the Keras 2 and
the Keras 3 benchmarks)."""

import platform


def cpu_name():
    """The CPU's model name from /proc/cpuinfo (the platform's processor name elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
