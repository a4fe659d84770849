"""What the benchmark and its runs both write down: JSON records, timestamps and the machine.

The benchmark (:mod:`recbole_st2si.benchmark`) and each run's process
(:mod:`recbole_st2si.benchmark_worker`) read and write the same records, so the format lives here and
neither of them imports the other.
"""

import json
import os
import platform
from datetime import datetime, timezone
from pathlib import Path

import torch

from recbole_st2si.safe_io import write_text

ATTEMPTS_SEPARATOR = "; then "  # joins the machines of a run resumed elsewhere, in its record's "hardware"


def read_json(path):
    """The record at ``path``, or None if it is missing or unreadable (it is then written anew)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def write_json(record, path):
    """Write atomically, so an interrupted benchmark never leaves a half-written file behind."""
    write_text(path, json.dumps(record, indent=2))


def now():
    """The current UTC time, to the second: records from several machines sort by it."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def cpu_model():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def usable_cores():
    """The cores this process may run on, which a container or ``taskset`` may limit below the machine's."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def hardware_summary():
    """The machine a run trained on, for the report (runs may come from several invocations)."""
    cores = usable_cores()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return f"CPU: {cpu_model()} ({cores} cores, {torch.get_num_threads()} torch threads); GPU: {gpu}"
