"""GPU devices and admission: a job starts on a GPU only when its models fit in free memory.

The probe is a plain function (device -> free MiB, or None when the device has no
GPU memory to manage) so tests can inject one; on a CPU admission is a no-op.

Both run in the node process, which never imports torch (it may not even be installed
there: the ``dicom-node`` image has none): CUDA devices are counted by a short child
process that imports torch, and free memory comes from NVML or ``nvidia-smi``.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Callable

from db.models import Job
from inference.registry import ModelRegistry
from kernel.catalog import PipelineSpec
from kernel.settings import ConfigError

log = logging.getLogger("inference.gpu")

FreeMemoryProbe = Callable[[str], "int | None"]


class WorkerUnavailableError(ConfigError):
    """Workers are asked for where they cannot run (no torch here); says what to do. A
    settings error: the command line prints it and exits, like any invalid setting."""


# Run in a child process: the CUDA devices torch sees (CUDA_VISIBLE_DEVICES applies).
_COUNT_CUDA = "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)"


def torch_installed() -> bool:
    """Whether torch can be imported here, found without importing it."""
    try:
        return importlib.util.find_spec("torch") is not None
    except (ImportError, ValueError):
        return False


def worker_devices(device: str, devices: list[str], timeout_s: float = 120.0) -> list[str]:
    """The devices that get one worker each: ``devices`` if given, else ``device``.

    ``auto`` is every CUDA GPU, or the CPU when there is none, as torch counts them in a
    child process (this process does not import torch). Raises
    ``WorkerUnavailableError`` when torch is not installed (the node image), saying how
    to run the node without local workers.
    """
    if not torch_installed():
        raise WorkerUnavailableError(
            "worker.enabled is true but torch is not installed here (the dicom-node image "
            "has no model runtime): set worker.enabled: false "
            "(DICOM_NODE_WORKER__ENABLED=false) or worker.broker_url for Celery workers, "
            "or run the dicom-node-worker image"
        )
    if devices:
        return list(devices)
    if device != "auto":
        return [device]
    count = cuda_device_count(timeout_s)
    return [f"cuda:{i}" for i in range(count)] or ["cpu"]


# (interpreter, CUDA_VISIBLE_DEVICES) -> CUDA devices torch counted there
_cuda_counts: dict[tuple[str, str | None], int] = {}


def cuda_device_count(timeout_s: float = 120.0) -> int:
    """The CUDA devices torch sees, counted in a child process (1-2 s: it imports torch).

    Counted once per process and ``CUDA_VISIBLE_DEVICES``: the count does not change
    while the machine runs, and a node started again in one process (the tests, a
    program embedding the node) need not wait for the child again. A failed count is not
    kept. Raises ``WorkerUnavailableError`` with the child's error output.
    """
    key = (sys.executable, os.environ.get("CUDA_VISIBLE_DEVICES"))
    if key in _cuda_counts:
        return _cuda_counts[key]
    try:
        proc = subprocess.run(
            [sys.executable, "-c", _COUNT_CUDA],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=True,
        )
        count = int(proc.stdout.strip().splitlines()[-1])
    except (subprocess.SubprocessError, ValueError, IndexError) as exc:
        detail = getattr(exc, "stderr", "") or str(exc)
        raise WorkerUnavailableError(
            f"device auto: counting CUDA devices with torch failed: {detail.strip()[-500:]}"
        ) from None
    _cuda_counts[key] = count
    return count


def free_memory_mb(device: str) -> int | None:
    """Free memory of a CUDA device in MiB (NVML if present, else ``nvidia-smi``); None on
    a CPU, or when neither can tell (the job is then admitted, and warned about).

    Both see memory used by every process (other workers, other programs) and neither
    creates a CUDA context or imports torch in the calling process (the node's). The index
    is the one NVML uses, which is torch's when CUDA_VISIBLE_DEVICES is not set.
    """
    if not device.startswith("cuda"):
        return None
    index = int(device.split(":", 1)[1]) if ":" in device else 0
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        return int(pynvml.nvmlDeviceGetMemoryInfo(handle).free // 2**20)
    except Exception:  # no NVML bindings or library: ask nvidia-smi
        pass
    smi = shutil.which("nvidia-smi")
    if smi is not None:
        try:
            proc = subprocess.run(
                [smi, "--query-gpu=memory.free", "--format=csv,noheader,nounits", f"-i={index}"],
                capture_output=True,
                text=True,
                timeout=10,
                check=True,
            )
            return int(proc.stdout.strip().splitlines()[0])
        except (subprocess.SubprocessError, ValueError, IndexError):
            pass
    if device not in _UNKNOWN_MEMORY:
        _UNKNOWN_MEMORY.add(device)
        log.warning("free memory of %s unknown (no NVML, no nvidia-smi): not checked", device)
    return None


_UNKNOWN_MEMORY: set[str] = set()  # devices already warned about


class Admission:
    """Decides whether a job may start on a device now (see ``queue.claim(admit=...)``).

    ``pipelines`` looks a job's pipeline up in the pipeline catalog; ``probe`` gives the
    device's free memory in MiB.
    """

    def __init__(
        self,
        device: str,
        pipelines: Callable[[str], PipelineSpec | None],
        registry: ModelRegistry,
        probe: FreeMemoryProbe = free_memory_mb,
    ) -> None:
        self.device = device
        self.pipelines = pipelines
        self.registry = registry
        self.probe = probe
        self.waiting: int | None = None  # job id waiting for memory (logged once)

    def needed_mb(self, pipeline: str) -> int:
        """The largest declared need of the pipeline's models (they run one at a time)."""
        spec = self.pipelines(pipeline)
        if spec is None:
            return 0
        needs = [
            self.registry.models[m].gpu_memory_mb for m in spec.models if m in self.registry.models
        ]
        return max(needs, default=0)

    def __call__(self, job: Job) -> bool:
        needed = self.needed_mb(job.pipeline)
        if needed == 0:
            return True
        free = self.probe(self.device)
        if free is None or free >= needed:
            self.waiting = None
            return True
        if self.waiting != job.id:
            self.waiting = job.id
            log.info(
                "job %s (%s) waits for %d MiB on %s, %d MiB free",
                job.id,
                job.pipeline,
                needed,
                self.device,
                free,
            )
        return False
