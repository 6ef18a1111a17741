"""What machine this is: the fingerprint plans are keyed by (GPU, driver, PCIe link, CPU, RAM)."""
from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

import psutil
import torch

from .home import short_hash

# Fields that identify the machine for a plan: a change in any of them makes its plans stale. The current
# PCIe link is left out on purpose: GPUs drop to a slower link when idle, so only the maximum is stable.
_IDENTITY_FIELDS = ("device_type", "gpu_name", "gpu_driver", "gpu_memory_total", "pcie_max_gen",
                    "pcie_max_width", "cpu_model", "cpu_count", "ram_total_gib")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _gpu_fields(device: torch.device) -> dict[str, Any]:
    """GPU name, driver, memory and PCIe link through NVML; torch's view when NVML is not there."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    props = torch.cuda.get_device_properties(index)
    fields: dict[str, Any] = {"gpu_name": props.name, "gpu_driver": None, "gpu_memory_total": int(props.total_memory),
                              "pcie_max_gen": None, "pcie_max_width": None, "pcie_gen": None, "pcie_width": None,
                              "cuda_version": torch.version.cuda}
    try:
        import pynvml
    except ImportError:
        return fields
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return fields
    try:
        # NVML numbers devices by PCI bus order, CUDA (by default) fastest first; match by bus id.
        bus = getattr(props, "pci_bus_id", None)
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        if bus is not None:
            pci = f"{getattr(props, 'pci_domain_id', 0):08x}:{bus:02x}:{getattr(props, 'pci_device_id', 0):02x}.0"
            try:
                handle = pynvml.nvmlDeviceGetHandleByPciBusId(pci.encode())
            except pynvml.NVMLError:
                pass
        name = pynvml.nvmlDeviceGetName(handle)
        fields["gpu_name"] = name.decode() if isinstance(name, bytes) else name
        driver = pynvml.nvmlSystemGetDriverVersion()
        fields["gpu_driver"] = driver.decode() if isinstance(driver, bytes) else driver
        fields["gpu_memory_total"] = int(pynvml.nvmlDeviceGetMemoryInfo(handle).total)
        for key, fn in (("pcie_max_gen", "nvmlDeviceGetMaxPcieLinkGeneration"),
                        ("pcie_max_width", "nvmlDeviceGetMaxPcieLinkWidth"),
                        ("pcie_gen", "nvmlDeviceGetCurrPcieLinkGeneration"),
                        ("pcie_width", "nvmlDeviceGetCurrPcieLinkWidth")):
            try:
                fields[key] = int(getattr(pynvml, fn)(handle))
            except (pynvml.NVMLError, AttributeError):
                pass
    except pynvml.NVMLError:
        pass
    finally:
        try:
            pynvml.nvmlShutdown()
        except pynvml.NVMLError:
            pass
    return fields


def machine_fingerprint(device: torch.device | str = "cpu") -> dict[str, Any]:
    """GPU name, driver, PCIe link (CUDA only; null on the CPU), CPU model, core count, RAM; `id` hashes them."""
    device = torch.device(device)
    ram = psutil.virtual_memory().total
    fp: dict[str, Any] = {
        "device_type": device.type,
        "gpu_name": None, "gpu_driver": None, "gpu_memory_total": None,
        "pcie_max_gen": None, "pcie_max_width": None, "pcie_gen": None, "pcie_width": None, "cuda_version": None,
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_physical_cores": psutil.cpu_count(logical=False),
        "ram_total": int(ram),
        "ram_total_gib": round(ram / 2 ** 30),  # rounded: what the kernel reserves may move a few MiB
        "torch": torch.__version__,
    }
    if device.type == "cuda":
        fp.update(_gpu_fields(device))
    fp["id"] = machine_id(fp)
    return fp


def machine_id(fp: dict[str, Any]) -> str:
    return short_hash({k: fp.get(k) for k in _IDENTITY_FIELDS})


def describe_machine(fp: dict[str, Any]) -> str:
    cpu = f"{fp.get('cpu_model')} ({fp.get('cpu_count')} threads, {fp.get('ram_total_gib')} GiB RAM)"
    if fp.get("gpu_name"):
        link = (f", PCIe gen{fp['pcie_max_gen']} x{fp['pcie_max_width']}"
                if fp.get("pcie_max_gen") else "")
        return f"{fp['gpu_name']} (driver {fp.get('gpu_driver') or '?'}{link}) on {cpu}"
    return cpu
