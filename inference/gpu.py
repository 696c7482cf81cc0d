"""GPU devices and admission: a job starts on a GPU only when its models fit in free memory.

The probe is a plain function (device -> free MiB, or None when the device has no
GPU memory to manage) so tests can inject one; on a CPU admission is a no-op.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from db.models import Job
from inference.registry import ModelRegistry
from kernel.catalog import PipelineSpec

log = logging.getLogger("inference.gpu")

FreeMemoryProbe = Callable[[str], "int | None"]


def worker_devices(device: str, devices: list[str]) -> list[str]:
    """The devices that get one worker each: ``devices`` if given, else ``device``.

    ``auto`` is every CUDA GPU, or the CPU when there is none.
    """
    if devices:
        return list(devices)
    if device != "auto":
        return [device]
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return [f"cuda:{i}" for i in range(count)] or ["cpu"]


def free_memory_mb(device: str) -> int | None:
    """Free memory of a CUDA device in MiB (NVML if present, else torch); None on a CPU.

    NVML sees memory used by every process (other workers, other programs), torch's
    ``mem_get_info`` does too (it asks the driver); NVML is tried first as it does not
    create a CUDA context in the calling process.
    """
    if not device.startswith("cuda"):
        return None
    index = int(device.split(":", 1)[1]) if ":" in device else 0
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        return int(pynvml.nvmlDeviceGetMemoryInfo(handle).free // 2**20)
    except Exception:  # no NVML: ask torch
        import torch

        free, _total = torch.cuda.mem_get_info(index)
        return int(free // 2**20)


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
