"""The machine a benchmark ran on, for its report (no TensorFlow import: shared by the Keras 2 and
the Keras 3 benchmarks)."""

import platform


def cpuinfo():
    """{field: value} of /proc/cpuinfo's first processor block (the first line of each field; {}
    where there is no /proc/cpuinfo)."""
    fields = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return fields


def cpu_name(detail=False):
    """The CPU's model name from /proc/cpuinfo (the platform's processor name elsewhere); ``detail``:
    with its family / model / stepping, e.g. "AMD EPYC (cpu family 25, model 17, stepping 1)"."""
    fields = cpuinfo()
    if "model name" not in fields:
        return platform.processor() or platform.machine()
    extra = ", ".join(f"{k} {fields[k]}" for k in ("cpu family", "model", "stepping") if k in fields)
    return f"{fields['model name']} ({extra})" if detail and extra else fields["model name"]
