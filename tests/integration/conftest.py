"""Fixtures of the integration tests that start real QEMU VMs."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.qemu_vm import Vm


@pytest.fixture
def vms(tmp_path: Path) -> Iterator[Callable[..., Vm]]:
    """Factory: start a VM (:class:`Vm` arguments); all are killed at the end,
    and their logs shown."""
    started: list[Vm] = []

    def start(image: Path, **kwargs: Any) -> Vm:
        vm = Vm(tmp_path, image, name=f"vm{len(started)}", **kwargs)
        started.append(vm)
        return vm

    yield start
    for vm in started:
        vm.stop()
        print(f"--- {vm.out.name} ---\n{vm.log()[-5000:]}")
