"""``dicom.receive_processes`` (validated, resolved) and the shared association registry of the receiving
processes (dicomnode.ingest.processes), without starting any process."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dicomnode.config import DicomSettings, load_settings
from dicomnode.errors import ConfigError
from dicomnode.ingest.processes import SharedReceivers


@pytest.mark.parametrize(("cpus", "expected"), [(1, 1), (2, 1), (3, 3), (4, 4), (16, 4)])
def test_auto_is_one_process_on_two_cpus_or_fewer(
    monkeypatch: pytest.MonkeyPatch, cpus: int, expected: int
) -> None:
    monkeypatch.setattr(os, "cpu_count", lambda: cpus)
    assert DicomSettings().receive_process_count == expected


def test_receive_processes_default_is_auto_min_4_cpus() -> None:
    d = DicomSettings()
    assert d.receive_processes == "auto"
    cpus = os.cpu_count() or 1
    assert d.receive_process_count == (1 if cpus <= 2 else min(4, cpus))
    assert DicomSettings(receive_processes=1).receive_process_count == 1
    assert DicomSettings(receive_processes=3).receive_process_count == 3


@pytest.mark.parametrize("value", [0, 65, "many", -1])
def test_receive_processes_out_of_range_is_refused_naming_the_field(tmp_path: Path, value: object) -> None:
    cfg = tmp_path / "node.yaml"
    cfg.write_text(f"dicom:\n  receive_processes: {value}\n")
    with pytest.raises(ConfigError, match="receive_processes"):
        load_settings(cfg)


def test_receive_processes_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DICOMNODE_DICOM__RECEIVE_PROCESSES", "2")
    assert load_settings(None).dicom.receive_process_count == 2


def _registry(tmp_path: Path, processes: int = 2, slots: int = 4) -> list[SharedReceivers]:
    """The records of ``processes`` receivers, as each process would see them (one array, one lock file)."""
    first = SharedReceivers(processes, slots, tmp_path / ".receivers.lock")
    views = [first]
    for _ in range(processes - 1):
        view = SharedReceivers.__new__(SharedReceivers)
        view.__setstate__(first.__getstate__())
        views.append(view)
    for i, view in enumerate(views):
        view.attach(i)
    return views


def test_admission_counts_the_associations_of_every_process(tmp_path: Path) -> None:
    a, b = _registry(tmp_path)
    # Process a holds two associations from 10.0.0.1; b is asked for a third from the same address.
    assert a.admit("10.0.0.1", [], max_total=3, per_address=2) == (0, 0)
    assert a.admit("10.0.0.1", ["10.0.0.1"], max_total=3, per_address=2) == (1, 1)
    assert b.admit("10.0.0.1", [], max_total=3, per_address=2) == (2, 2)  # refused by the caller
    assert b.admit("10.0.0.9", [], max_total=3, per_address=2) == (2, 0)  # admitted: slot taken
    assert b.admit("10.0.0.8", ["10.0.0.9"], max_total=3, per_address=2) == (3, 0)  # total reached
    # An association of a ends: a publishes what it still holds, and the slot is free for b.
    a.publish(["10.0.0.1"], 1)
    assert b.admit("10.0.0.8", ["10.0.0.9"], max_total=3, per_address=2) == (2, 0)


def test_a_process_that_ended_holds_no_slot_and_is_not_waited_for(tmp_path: Path) -> None:
    a, b = _registry(tmp_path)
    a.admit("10.0.0.1", [], max_total=2, per_address=2)
    a.admit("10.0.0.1", ["10.0.0.1"], max_total=2, per_address=2)
    assert b.admit("10.0.0.2", [], max_total=2, per_address=2) == (2, 0)
    a.clear(0)  # the node's process saw it end
    assert b.admit("10.0.0.2", [], max_total=2, per_address=2) == (0, 0)
    b.publish([], 5)
    b.wait_turn()  # returns at once: the ended process never counts as "fewer connections"


def test_counts_of_the_receiving_processes_are_folded_once(tmp_path: Path) -> None:
    from dicomnode.ingest import prometheus as metrics

    a, b = _registry(tmp_path)
    stored = metrics.INSTANCES.labels(source="dimse", result="stored")
    before = stored._value.get()
    a.count_instance("dimse", "stored", 100)
    b.count_instance("dimse", "stored", 100)
    b.count_instance("stow", "stored", 100)  # STOW-RS is counted by the node's process itself
    a.fold_metrics()
    a.fold_metrics()
    assert stored._value.get() - before == 2
