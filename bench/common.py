"""What every bench shares: an argument parser whose ``--help`` shows the module docstring
and each option's default, and the machine line a bench prints first (figures recorded in
docs/benchmarks.md say which machine they come from)."""

from __future__ import annotations

import argparse
import os
import platform
from pathlib import Path


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults appended to each option's help (unless empty or off); the docstring's layout
    (formulas, the command to run) kept as written."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, "", False):
            return action.help
        return super()._get_help_string(action)


def parser(doc: str | None) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(description=doc, formatter_class=_HelpFormatter)


def machine_line(device: str = "auto") -> str:
    """CPU model, cores, vector extensions, library versions and the device, in one line."""
    import faiss
    import torch

    from pictor.core.embedder import cpu_has_fast_bf16, resolve_device

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"machine: {cpu}, {os.cpu_count()} cores, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads, {torch.backends.cpu.get_cpu_capability()}), "
            f"native bf16 (AMX/AVX512-BF16): {'yes' if cpu_has_fast_bf16() else 'no'}, "
            f"faiss {faiss.__version__}, device {resolve_device(device)}")
