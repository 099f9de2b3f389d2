"""The one write path for received instances, shared by the C-STORE SCP and the STOW-RS receiver.

Durability contract (ARCHITECTURE.md): an instance is confirmed (status 0x0000) only when its bytes are on
disk (temp file, fsync, rename, directory fsync; without the flushes under ``dicom.durability: process``,
below) *and* recorded in the database. Everything else returns a
failure status with a one-line comment, so the sender keeps its copy and retries; nothing raises.

Group commit (:class:`_GroupCommit`): the receiving thread writes the bytes to a temp file and flushes them
(fdatasync); then one of the waiting threads, the leader, takes every instance waiting at that moment,
renames each file into place, flushes each touched directory once, and records the whole batch in one
database transaction. Only then is each sender answered. Concurrent associations thus share the directory
flushes and one database commit, and the file is always durable *before* its record exists: the database
never holds a record whose file did not land, and an instance refused for any reason (0xA700 disk full,
0xA701...) leaves no record.

What survives what (the guarantee behind a success status):

* a crash of the process (kill -9, OOM kill) at any moment: every confirmed instance, file and record. The
  page cache belongs to the kernel, so even without the flushes a completed write survives; a crash between
  the rename and the commit leaves a file without a record for an instance never confirmed (its sender
  resends; :func:`reindex_spool` records it too); a half-written temp file is removed at the next start
  (:meth:`Spool.remove_stale_temp`).
* a power loss or kernel crash: every confirmed instance too, because the file data (fdatasync), its
  directory entries (directory fsync) and the database commit (SQLite WAL with ``synchronous=FULL``, or
  PostgreSQL's commit) are flushed to the device before the answer; on hardware that honours flushes.
  This is ``dicom.durability: power`` (the default, ``fsync=True``).

``dicom.durability: process`` (``fsync=False``, the recording connection on SQLite ``synchronous=NORMAL``,
built by ``dicomnode.cli.node.build_spool``) keeps the first promise and drops the second: the same write,
rename and commit in the same order before the answer, but no flush. A completed write and rename live in the
kernel's page cache and a WAL commit survives a crash of the application whatever its synchronous setting, so
a kill -9 still loses nothing confirmed; a power loss or kernel crash may lose (or truncate, or leave without
its file) what was confirmed in the seconds before it, until the kernel wrote it back.

Temp files created ahead (:class:`_TempFiles`): a C-STORE's bytes go into an empty temp file that a
background thread created before the request arrived (a few at a time, each kept open), so creating a file
(the inode allocation: on ext4 without a journal, after many deletions, a quarter of the receiver's CPU) is
off the path between a request and its answer. Nothing else changes: the same write, flush, rename,
directory flush and commit. They are ordinary temp files: never confirmed to anyone, removed by
:meth:`Spool.close`, and after a crash at the next start like every temp file of a process that is gone.

Layout under the spool root::

    <study>/<series>/<sop>.dcm            analysed SOP classes (CT, Enhanced CT), bytes as received
    ignored/<study>/<series>/<sop>.dcm    other storage classes under the "ignore" policy
    .tmp/                                 files being written or created ahead, empty (never confirmed;
                                          safe to delete when their process is gone)

Duplicates (same SOP Instance UID) are **overwritten**: the last copy received wins, atomically (rename over
the old file), and the sink is told again (it reports whether the instance was new).

Status codes returned (PS3.4 B.2.3 / PS3.18 table 10.5-3 ranges):

====== =================================================================
0x0000 stored (or accepted and ignored)
0xA700 out of resources: free space below the configured floor, or disk full
0xA701 out of resources: the spool could not be written (I/O error)
0xA702 out of resources: the database record failed (the file is kept; reindex_spool picks it up)
0xA900 dataset does not match the SOP class of the request (or the study of a STOW request)
0xC210 cannot understand: bytes are not a complete, parseable dataset
0xC211 cannot understand: a required UID is missing or invalid
0xC212 cannot understand: dataset SOP Instance UID differs from the request's
0x0122 SOP class not supported (STOW-RS, "refuse" policy)
0x0110 processing failure (an unexpected error; logged)
====== =================================================================
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import math
import os
import re
import shutil
import threading
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from types import MappingProxyType
from typing import Any

from pydicom.dataset import Dataset
from pydicom.filereader import _read_file_meta_info, read_preamble
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID

from dicomnode.ingest import prometheus as metrics
from dicomnode.ingest.consistency import INSTANCE_MISMATCH as _CLAIMED_INSTANCE_MISMATCH
from dicomnode.ingest.consistency import SOP_CLASS_MISMATCH as _CLAIMED_CLASS_MISMATCH
from dicomnode.ingest.consistency import claim_mismatch
from dicomnode.ingest.dicomparse import (
    DatasetError,
    HeaderScan,
    encode_file_meta,
    get_uid,
    is_valid_uid,
    parse_header,
    scan_header,
)
from dicomnode.ingest.sink import InstanceSink, ReceivedInstance
from dicomnode.vocab import CT_IMAGE_STORAGE_SOP_CLASSES

LOGGER = logging.getLogger(__name__)

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
OUT_OF_RESOURCES_WRITE = 0xA701
OUT_OF_RESOURCES_DATABASE = 0xA702
DATASET_MISMATCH = _CLAIMED_CLASS_MISMATCH
CANNOT_UNDERSTAND = 0xC210
INVALID_UID = 0xC211
INSTANCE_MISMATCH = _CLAIMED_INSTANCE_MISMATCH
SOP_CLASS_NOT_SUPPORTED = 0x0122
PROCESSING_FAILURE = 0x0110

#: The SOP classes the node analyses; everything else follows :class:`OtherClassPolicy`.
ANALYSED_SOP_CLASSES: frozenset[str] = CT_IMAGE_STORAGE_SOP_CLASSES

#: Implementation identity written in the file meta of instances received over DIMSE.
IMPLEMENTATION_VERSION_NAME = "DICOMNODE_01"

IGNORED_DIR = "ignored"
_SERIES_CACHE_SIZE = 256
TEMP_DIR = ".tmp"


class OtherClassPolicy(StrEnum):
    """What to do with storage SOP classes the node does not analyse (SR, SC, RT, PT, MR, Seg, KOs...)."""

    IGNORE = "ignore"  # accept (success), keep under ignored/, record as ignored
    DISCARD = "discard"  # accept (success), keep nothing, record as ignored
    REFUSE = "refuse"  # not negotiated over DIMSE; 0x0122 over STOW-RS

    @classmethod
    def coerce(cls, value: OtherClassPolicy | str | bool) -> OtherClassPolicy:
        """Read a config value: a policy name, or a boolean (True = ignore, False = refuse)."""
        if isinstance(value, bool):
            return cls.IGNORE if value else cls.REFUSE
        return cls(str(value).lower())


@dataclass(frozen=True)
class IngestResult:
    """Outcome of one received instance: the DICOM status to answer with, and what happened."""

    status: int
    comment: str | None = None
    sop_class_uid: str | None = None
    sop_instance_uid: str | None = None
    study_instance_uid: str | None = None
    series_instance_uid: str | None = None
    path: Path | None = None
    ignored: bool = False
    #: True when the sink already knew this SOP instance (the file was overwritten).
    duplicate: bool = False
    size_bytes: int = 0

    @property
    def ok(self) -> bool:
        """Success or warning (0x0000, 0x0001, 0xB000-0xBFFF): the sender may consider it stored."""
        return self.status in (0x0000, 0x0001) or 0xB000 <= self.status <= 0xBFFF


@dataclass
class ReindexReport:
    """What :func:`reindex_spool` found."""

    recorded_new: int = 0
    already_known: int = 0
    failed: list[tuple[Path, str]] = field(default_factory=list)
    stale_temp_removed: int = 0


HeaderFn = Callable[[Dataset], Mapping[str, Any]]


def _default_header_fn() -> HeaderFn:
    # Resolved at Spool construction, not at import, so ingest stays importable on its own.
    from dicomnode.imaging.headers import SUMMARY_KEYWORDS, header_dict

    def summary(ds: Dataset) -> Mapping[str, Any]:
        return header_dict(ds, SUMMARY_KEYWORDS)

    return summary


#: Temp file names: ``<pid>-<hex>.part``.
_TEMP_NAME = re.compile(r"^([0-9]+)-[0-9a-f]+\.part$")
#: The hex of a temp file name: a random token per process, then a counter (unique without a system call).
_TEMP_TOKEN = uuid.uuid4().hex[:16]
_TEMP_COUNTER = itertools.count()


def _write_all(fd: int, *parts: bytes | memoryview) -> None:
    """Write ``parts`` to ``fd`` in order (writev; again from where a short write stopped)."""
    views = [memoryview(p).cast("B") for p in parts if len(p)]
    writev = getattr(os, "writev", None)
    while views:
        n = writev(fd, views) if writev is not None else os.write(fd, views[0])
        while views and n >= len(views[0]):
            n -= len(views[0])
            views.pop(0)
        if views and n:
            views[0] = views[0][n:]


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, owned by someone else
        return True
    return True


def _fsync_dir(path: Path) -> None:
    # A rename is durable only once the directory entry is flushed (POSIX); not possible on Windows.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _sync_data(fd: int) -> None:
    # fdatasync flushes the data and the metadata needed to read it back (size), skipping timestamps.
    sync = getattr(os, "fdatasync", os.fsync)
    sync(fd)


def _raw_floats(header: HeaderScan, tag: int, n: int) -> tuple[float, ...] | None:
    text = header.text(tag)
    if text is None:
        return None
    try:
        out = tuple(float(v) for v in text.split("\\"))
    except ValueError:
        return None
    return out if len(out) == n and all(math.isfinite(v) for v in out) else None


def _raw_int(header: HeaderScan, tag: int) -> int | None:
    text = header.text(tag)
    if text is None:
        return None
    try:
        return int(text)
    except ValueError:
        return None


#: Tags read from every received header, as raw text (no pydicom value conversion: the structure check
#: collects them on its walk, see dicomparse.scan_header).
_UID_TAGS = {
    "SOPClassUID": 0x00080016,
    "SOPInstanceUID": 0x00080018,
    "StudyInstanceUID": 0x0020000D,
    "SeriesInstanceUID": 0x0020000E,
}
_INSTANCE_NUMBER, _IMAGE_POSITION, _IMAGE_ORIENTATION = 0x00200013, 0x00200032, 0x00200037
_SCANNED_TAGS = frozenset((*_UID_TAGS.values(), _INSTANCE_NUMBER, _IMAGE_POSITION, _IMAGE_ORIENTATION))


def _floats(value: Any, n: int) -> tuple[float, ...] | None:
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return out if len(out) == n else None


def _instance_number(ds: Dataset) -> int | None:
    try:
        value = ds.get("InstanceNumber")
        return None if value is None or value == "" else int(value)
    except (TypeError, ValueError):
        return None


class Spool:
    """Write received instances durably under ``root`` and record them in ``sink``.

    Parameters
    ----------
    root
        Spool directory (created if missing). Temp files live in ``root/.tmp`` so renames stay on one
        filesystem.
    sink
        Where each stored instance is recorded (the store in production).
    free_space_floor_mb
        Refuse (0xA700) when the free space of the spool filesystem is below this many MB (10^6 bytes).
    other_classes
        Policy for SOP classes outside ``analysed_sop_classes``.
    analysed_sop_classes
        SOP classes kept in the main spool for analysis.
    header_fn
        ``Dataset -> {keyword: value}`` series/study summary for routing; default
        ``dicomnode.imaging.headers.header_dict`` with its ``SUMMARY_KEYWORDS``.
    fsync
        Flush files and directories to disk before confirming: True for ``dicom.durability: power`` (a
        confirmed instance survives a power loss, with a sink that flushes its commits too), False for
        ``process`` (it survives a crash of the process: the order write, rename, record, answer is the same).
    on_result
        Optional callback called with every :class:`IngestResult` (never allowed to break ingest).
    """

    def __init__(
        self,
        root: Path,
        sink: InstanceSink,
        *,
        free_space_floor_mb: float = 0.0,
        other_classes: OtherClassPolicy | str | bool = OtherClassPolicy.IGNORE,
        analysed_sop_classes: frozenset[str] = ANALYSED_SOP_CLASSES,
        header_fn: HeaderFn | None = None,
        fsync: bool = True,
        on_result: Callable[[IngestResult], None] | None = None,
    ) -> None:
        self.root = Path(root).resolve()
        self.sink = sink
        self.free_space_floor_bytes = int(free_space_floor_mb * 1_000_000)
        self.other_classes = OtherClassPolicy.coerce(other_classes)
        self.analysed_sop_classes = frozenset(analysed_sop_classes)
        self.header_fn: HeaderFn = header_fn if header_fn is not None else _default_header_fn()
        self.fsync = fsync
        self.on_result = on_result
        self._committer: _GroupCommit | None = None
        self._temp_files: _TempFiles | None = None
        self._known_dirs: set[Path] = set()
        self.temp_dir = self.root / TEMP_DIR
        self.ignored_dir = self.root / IGNORED_DIR
        self.temp_dir.mkdir(parents=True, exist_ok=True)
        self.remove_stale_temp()
        self._cache_lock = threading.Lock()
        self._series_cache: OrderedDict[str, Mapping[str, Any]] = OrderedDict()

    # -- policy -------------------------------------------------------------------------------------
    def is_analysed(self, sop_class_uid: str) -> bool:
        """Whether instances of this SOP class are kept for analysis."""
        return sop_class_uid in self.analysed_sop_classes

    def accepts(self, sop_class_uid: str) -> bool:
        """Whether instances of this SOP class are accepted (analysed, or other under ignore/discard)."""
        return self.is_analysed(sop_class_uid) or self.other_classes is not OtherClassPolicy.REFUSE

    def has_free_space(self) -> bool:
        """Whether the spool filesystem has more free space than the configured floor."""
        if self.free_space_floor_bytes <= 0:
            return True
        try:
            return shutil.disk_usage(self.root).free >= self.free_space_floor_bytes
        except OSError:
            return False

    def final_path(self, study: str, series: str, sop: str, *, ignored: bool) -> Path:
        """Where an instance with these (validated) UIDs is stored."""
        base = self.ignored_dir if ignored else self.root
        return base / study / series / f"{sop}.dcm"

    def new_temp_path(self) -> Path:
        """A fresh path in the spool temp area (same filesystem as the final paths).

        The name starts with this process's id, so that a later start can tell a file left by a process
        that died (removed at start-up, :meth:`remove_stale_temp`) from one another live process is writing.
        """
        return self.temp_dir / f"{os.getpid()}-{_TEMP_TOKEN}{next(_TEMP_COUNTER):x}.part"

    def remove_stale_temp(self, *, legacy_age_s: float = 300.0) -> int:
        """Delete temp files whose writing process is gone (a crash, kill -9); return how many.

        Run at construction. A temp file was never confirmed to any sender (confirmation comes only after
        the rename), so deleting it loses nothing. A file named by a process that still runs (this one, or
        another receiver on the same spool) is kept; a file without a process id in its name (an earlier
        version) is deleted once older than ``legacy_age_s``. A file named with this process's id but not by
        this process (another token: an earlier process that had the same id, as a container's node does at
        every start) is deleted too.
        """
        own = f"{os.getpid()}-"
        mine = f"{own}{_TEMP_TOKEN}"
        removed = 0
        now = time.time()
        try:
            entries = list(self.temp_dir.iterdir())
        except OSError:
            return 0
        for tmp in entries:
            m = _TEMP_NAME.match(tmp.name)
            try:
                if m is not None:
                    if tmp.name.startswith(own):
                        if tmp.name.startswith(mine):
                            continue
                    elif _process_alive(int(m.group(1))):
                        continue
                elif now - tmp.stat().st_mtime < legacy_age_s:
                    continue
                if tmp.is_file():
                    tmp.unlink()
                    removed += 1
            except OSError:
                continue
        if removed:
            LOGGER.info("spool: removed %d temp file(s) left by a process that ended", removed)
        return removed

    # -- entry points -------------------------------------------------------------------------------
    def ingest_dataset(
        self,
        dataset_bytes: bytes | memoryview,
        transfer_syntax_uid: str,
        *,
        sop_class_uid: str | None = None,
        sop_instance_uid: str | None = None,
        calling_ae_title: str | None = None,
        source: str = "dimse",
    ) -> IngestResult:
        """Store a dataset received without file meta (a C-STORE request), exactly as encoded.

        Parameters
        ----------
        dataset_bytes
            The encoded dataset (``event.request.DataSet.getvalue()``, or a view of the buffer it was
            received into: only the header before the pixel data is copied, the rest goes to the file).
        transfer_syntax_uid
            The transfer syntax of the presentation context it arrived on.
        sop_class_uid, sop_instance_uid
            Affected SOP Class / Instance UID of the request; the dataset must agree.
        calling_ae_title
            The sender, recorded in the file meta (Source Application Entity Title) and the record.
        source
            Label for records and metrics.

        Returns
        -------
        IngestResult
            Never raises; the status to answer with is ``result.status``.
        """
        try:
            return self._finish(
                self._ingest_dataset(
                    dataset_bytes,
                    transfer_syntax_uid,
                    sop_class_uid,
                    sop_instance_uid,
                    calling_ae_title,
                    source,
                ),
                source,
            )
        except Exception as exc:  # the handler contract: never raise, answer a failure status
            LOGGER.exception("unexpected error while storing an instance from %s", calling_ae_title)
            return self._finish(
                IngestResult(PROCESSING_FAILURE, f"processing failure: {type(exc).__name__}"), source
            )

    def ingest_file(
        self,
        path: Path,
        *,
        calling_ae_title: str | None = None,
        source: str = "stow",
        expected_study_uid: str | None = None,
    ) -> IngestResult:
        """Store a Part 10 file, bytes unchanged (STOW-RS parts, imports).

        A file in this spool's temp area (:meth:`new_temp_path`, e.g. a streamed STOW-RS part) is taken
        over: renamed into place, or deleted when refused. Any other file is copied first and left as it is.

        Parameters
        ----------
        path
            The Part 10 file.
        calling_ae_title
            Who sent it, for the record (None for STOW-RS).
        source
            Label for records and metrics.
        expected_study_uid
            For ``POST /studies/{study}``: instances of another study fail with 0xA900.

        Returns
        -------
        IngestResult
            Never raises.
        """
        path = Path(path)
        temp: Path | None = None
        try:
            if path.resolve().parent == self.temp_dir:
                temp = path
            else:
                if not self.has_free_space():
                    return self._finish(
                        IngestResult(OUT_OF_RESOURCES, "out of resources: spool free space below floor"),
                        source,
                    )
                temp = self.new_temp_path()
                shutil.copyfile(path, temp)
            result = self._ingest_file(temp, calling_ae_title, source, expected_study_uid)
        except Exception as exc:
            LOGGER.exception("unexpected error while storing a %s instance", source)
            result = IngestResult(PROCESSING_FAILURE, f"processing failure: {type(exc).__name__}")
        finally:
            if temp is not None:
                with contextlib.suppress(OSError):
                    temp.unlink(missing_ok=True)
        return self._finish(result, source)

    # -- internals ----------------------------------------------------------------------------------
    def _finish(self, result: IngestResult, source: str) -> IngestResult:
        if result.ok:
            metrics.count_instance(source, "ignored" if result.ignored else "stored", result.size_bytes)
        else:
            metrics.count_instance(source, "failed")
            LOGGER.warning(
                "refused instance %s from %s: 0x%04X %s",
                result.sop_instance_uid or "?",
                source,
                result.status,
                result.comment or "",
            )
        if self.on_result is not None:
            try:
                self.on_result(result)
            except Exception:
                LOGGER.exception("ingest on_result callback failed")
        return result

    def _ingest_dataset(
        self,
        data: bytes | memoryview,
        ts: str,
        cmd_class: str | None,
        cmd_instance: str | None,
        calling_ae: str | None,
        source: str,
    ) -> IngestResult:
        if not self.has_free_space():
            return IngestResult(OUT_OF_RESOURCES, "out of resources: spool free space below floor")
        try:
            header = scan_header(data, ts, _SCANNED_TAGS)
            checked = self._check_uids(header, cmd_class, cmd_instance, None)
        except DatasetError as exc:
            return IngestResult(CANNOT_UNDERSTAND, str(exc), sop_instance_uid=cmd_instance)
        if isinstance(checked, IngestResult):
            return checked
        sop_class, sop, study, series = checked

        ae = calling_ae if calling_ae and all(32 <= ord(c) < 127 and c != "\\" for c in calling_ae) else None
        meta = encode_file_meta(
            sop_class,
            sop,
            ts,
            PYDICOM_IMPLEMENTATION_UID,
            IMPLEMENTATION_VERSION_NAME,
            ae[:16] if ae else None,
        )

        def write(fd: int) -> None:
            # One system call from the received buffer to the page cache (no copy in between).
            _write_all(fd, meta, data)

        return self._commit(
            header, sop_class, sop, study, series, ts, len(data), calling_ae, source, write=write
        )

    def _ingest_file(
        self, temp_path: Path, calling_ae: str | None, source: str, expected_study: str | None
    ) -> IngestResult:
        if not self.has_free_space():
            return IngestResult(OUT_OF_RESOURCES, "out of resources: spool free space below floor")
        try:
            with open(temp_path, "rb") as fp:
                read_preamble(fp, False)
                meta = _read_file_meta_info(fp)
                data = fp.read()
        except Exception as exc:  # no preamble/DICM prefix, broken meta group
            return IngestResult(
                CANNOT_UNDERSTAND, f"not a DICOM Part 10 file: {type(exc).__name__}: {exc}"[:200]
            )
        ts = get_uid(meta, "TransferSyntaxUID")
        if ts is None:
            return IngestResult(CANNOT_UNDERSTAND, "file meta has no Transfer Syntax UID")
        try:
            header = scan_header(data, ts, _SCANNED_TAGS)
            checked = self._check_uids(header, None, None, expected_study)
        except DatasetError as exc:
            return IngestResult(CANNOT_UNDERSTAND, str(exc))
        if isinstance(checked, IngestResult):
            return checked
        sop_class, sop, study, series = checked
        return self._commit(
            header, sop_class, sop, study, series, ts, len(data), calling_ae, source, existing=temp_path
        )

    def _check_uids(
        self, header: HeaderScan, cmd_class: str | None, cmd_instance: str | None, expected_study: str | None
    ) -> tuple[str, str, str, str] | IngestResult:
        """The four UIDs, checked, or the refusal. Raises DatasetError when the header of the first instance
        of a series (the one whose summary routing keeps) cannot be parsed."""
        values: dict[str, str] = {}
        for keyword, tag in _UID_TAGS.items():
            value = header.text(tag)
            if value is None:
                return IngestResult(INVALID_UID, f"missing {keyword}", sop_instance_uid=cmd_instance)
            if not is_valid_uid(value):
                return IngestResult(INVALID_UID, f"invalid {keyword}", sop_instance_uid=cmd_instance)
            values[keyword] = value
        sop_class, sop = values["SOPClassUID"], values["SOPInstanceUID"]
        study, series = values["StudyInstanceUID"], values["SeriesInstanceUID"]
        ids: dict[str, Any] = {"sop_class_uid": sop_class, "sop_instance_uid": sop}
        mismatch = claim_mismatch(sop_class, sop, cmd_class, cmd_instance)
        if mismatch is not None:
            return IngestResult(mismatch.status, mismatch.comment, **ids)
        if expected_study is not None and expected_study != study:
            return IngestResult(DATASET_MISMATCH, "instance belongs to another study than the request", **ids)
        if not self.accepts(sop_class):
            return IngestResult(SOP_CLASS_NOT_SUPPORTED, "SOP class not supported", **ids)
        with self._cache_lock:
            known = series in self._series_cache
        if not known:
            # pydicom reads the header of the first instance of each series (for its summary); any other
            # instance is routed on what the structure check collected, so its header is parsed no more.
            header.dataset()
        return sop_class, sop, study, series

    def _commit(
        self,
        header: HeaderScan,
        sop_class: str,
        sop: str,
        study: str,
        series: str,
        ts: str,
        size: int,
        calling_ae: str | None,
        source: str,
        *,
        write: Callable[[int], None] | None = None,
        existing: Path | None = None,
    ) -> IngestResult:
        ignored = not self.is_analysed(sop_class)
        ids: dict[str, Any] = {
            "sop_class_uid": sop_class,
            "sop_instance_uid": sop,
            "study_instance_uid": study,
            "series_instance_uid": series,
            "ignored": ignored,
            "size_bytes": size,
        }
        keep = not (ignored and self.other_classes is OtherClassPolicy.DISCARD)
        final = self.final_path(study, series, sop, ignored=ignored) if keep else None
        record = self._record(
            header, sop_class, sop, study, series, ts, size, calling_ae, source, final, ignored
        )
        # This thread writes the bytes and flushes them (fdatasync releases the GIL, so the associations
        # flush side by side and the filesystem journal groups them); the group commit then renames the files
        # of every instance waiting at that moment, flushes their directories once and records them all in
        # one database transaction. The status is answered only after that (see _GroupCommit).
        tmp: Path | None = None
        if final is not None:
            fd: int | None = None
            if existing is not None:
                tmp = existing
            else:
                ahead = self._ahead().take() if write is not None else None
                tmp, fd = ahead if ahead is not None else (self.new_temp_path(), None)
            try:
                self._write_temp(tmp, write, fd)
            except OSError as exc:
                if existing is None:
                    with contextlib.suppress(OSError):
                        tmp.unlink(missing_ok=True)
                return self._land_failed(exc, sop, ids)
        return self._group_commit().submit(_Pending(tmp, final, record, ids, sop))

    def _write_temp(self, tmp: Path, write: Callable[[int], None] | None, fd: int | None = None) -> None:
        """Write (``write``) and flush ``tmp``; ``fd``: the file already open for writing (created ahead),
        closed here."""
        if fd is None:
            if write is None and not self.fsync:
                return
            flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | _O_CLOEXEC if write else os.O_RDWR
            fd = os.open(tmp, flags, 0o644)
        try:
            if write is not None:
                write(fd)
            if self.fsync:
                _sync_data(fd)
        finally:
            os.close(fd)

    def _ahead(self) -> _TempFiles:
        with self._cache_lock:
            if self._temp_files is None:
                self._temp_files = _TempFiles(self)
            return self._temp_files

    def _group_commit(self) -> _GroupCommit:
        with self._cache_lock:
            if self._committer is None:
                self._committer = _GroupCommit(self)
            return self._committer

    def _land_failed(self, exc: OSError, sop: str, ids: dict[str, Any]) -> IngestResult:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return IngestResult(OUT_OF_RESOURCES, "out of resources: disk full", **ids)
        LOGGER.error("spool write failed for %s: %s", sop, exc)
        return IngestResult(OUT_OF_RESOURCES_WRITE, f"spool write failed: {exc.strerror or exc}", **ids)

    def _record(
        self,
        header: HeaderScan,
        sop_class: str,
        sop: str,
        study: str,
        series: str,
        ts: str,
        size: int,
        calling_ae: str | None,
        source: str,
        final: Path | None,
        ignored: bool,
    ) -> ReceivedInstance:
        return ReceivedInstance(
            study_instance_uid=study,
            series_instance_uid=series,
            sop_instance_uid=sop,
            sop_class_uid=sop_class,
            transfer_syntax_uid=ts,
            path=final,
            size_bytes=size,
            ignored=ignored,
            source=source,
            calling_ae_title=calling_ae,
            attributes=self._series_attributes(series, header, sop),
            instance_number=_raw_int(header, _INSTANCE_NUMBER),
            image_position_patient=_raw_floats(header, _IMAGE_POSITION, 3),  # type: ignore[arg-type]
            image_orientation_patient=_raw_floats(header, _IMAGE_ORIENTATION, 6),  # type: ignore[arg-type]
        )

    def _series_attributes(self, series: str, header: HeaderScan, sop: str) -> Mapping[str, Any]:
        # The summary holds series/study-level attributes, identical for every instance of a series; it is
        # computed for the first instance of a series and reused (the first instance wins, as in
        # imaging.headers.summarize), which keeps a 300-slice series from paying for it 300 times.
        with self._cache_lock:
            cached = self._series_cache.get(series)
            if cached is not None:
                self._series_cache.move_to_end(series)
                return cached
        try:
            attributes: Mapping[str, Any] = MappingProxyType(dict(self.header_fn(header.dataset())))
        except Exception as exc:  # a summary problem must not lose the instance; routing sees fewer keys
            LOGGER.warning("header summary failed for %s: %s", sop, exc)
            attributes = MappingProxyType({})
        with self._cache_lock:
            self._series_cache[series] = attributes
            while len(self._series_cache) > _SERIES_CACHE_SIZE:
                self._series_cache.popitem(last=False)
        return attributes

    def _new_dirs(self, final: Path) -> list[Path]:
        """Folders between the spool root and ``final`` that do not exist yet (created here)."""
        parent = final.parent
        if parent in self._known_dirs and parent.is_dir():
            return []
        new_dirs = [d for d in (parent, *parent.parents) if d != self.root and self.root in d.parents]
        new_dirs = [d for d in new_dirs if not d.is_dir()]
        if new_dirs:
            parent.mkdir(parents=True, exist_ok=True)
        if len(self._known_dirs) > 4096:
            self._known_dirs.clear()
        self._known_dirs.add(parent)
        return new_dirs

    def close(self) -> None:
        """Stop creating temp files ahead and remove those not used (a later C-STORE starts again)."""
        with self._cache_lock:
            committer, self._committer = self._committer, None
            ahead, self._temp_files = self._temp_files, None
        if committer is not None:
            committer.close()
        if ahead is not None:
            ahead.close()

    # -- recovery -----------------------------------------------------------------------------------
    def reindex(self, *, stale_temp_age_s: float = 86_400.0) -> ReindexReport:
        """See :func:`reindex_spool`."""
        return reindex_spool(self, stale_temp_age_s=stale_temp_age_s)


_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
#: How many empty temp files a spool keeps created ahead (refilled when half are used).
TEMP_FILES_AHEAD = 16
#: A file created ahead and unused for this long is not used (reindex_spool removes temp files a day old).
TEMP_AHEAD_MAX_AGE_S = 3600.0


class _TempFiles:
    """Empty temp files created ahead by a background thread, each open for writing (see the module doc).

    :meth:`take` hands one out without a system call, or None when none is ready (the caller creates its
    own, as before: the first instances after a start, a burst faster than the thread, a full disk). The
    thread wakes when half are used and refills them all, so it costs one wake-up per ``size // 2``
    instances; creating a file holds the interpreter lock only around the system call.
    """

    def __init__(self, spool: Spool, size: int = TEMP_FILES_AHEAD) -> None:
        self._spool = spool
        self._size = size
        self._low = max(1, size // 2)
        self._ready: deque[tuple[Path, int, float]] = deque()
        self._cond = threading.Condition()
        self._wanted = True  # fill at once
        self._closed = False
        self._thread = threading.Thread(target=self._fill, name="dicomnode-spool-ahead", daemon=True)
        self._thread.start()

    def take(self) -> tuple[Path, int] | None:
        """``(path, descriptor)`` of an empty temp file created ahead, or None."""
        try:
            path, fd, made = self._ready.popleft()
        except IndexError:
            self._want()
            return None
        if len(self._ready) < self._low and not self._wanted:
            self._want()
        if time.monotonic() - made > TEMP_AHEAD_MAX_AGE_S:
            _discard(path, fd)
            return None
        return path, fd

    def close(self) -> None:
        """Stop the thread; close and remove the files not taken."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout=10)
        self._drain()

    def _want(self) -> None:
        with self._cond:
            if not self._wanted and not self._closed:
                self._wanted = True
                self._cond.notify()

    def _fill(self) -> None:
        try:
            while True:
                with self._cond:
                    while not self._wanted and not self._closed:
                        self._cond.wait()
                    if self._closed:
                        return
                    self._wanted = False
                while len(self._ready) < self._size and not self._closed:
                    path = self._spool.new_temp_path()
                    try:
                        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_CLOEXEC, 0o644)
                    except OSError as exc:  # a full disk, permissions: the receivers create and report
                        LOGGER.debug("spool: no temp file created ahead: %s", exc)
                        break
                    self._ready.append((path, fd, time.monotonic()))
        finally:
            if self._closed:
                self._drain()

    def _drain(self) -> None:
        while True:
            try:
                path, fd, _ = self._ready.popleft()
            except IndexError:
                return
            _discard(path, fd)


def _discard(path: Path, fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)
    with contextlib.suppress(OSError):
        path.unlink(missing_ok=True)


class _Pending:
    """One instance whose bytes are written and flushed, waiting for the group commit."""

    __slots__ = ("final", "ids", "record", "result", "sop", "tmp", "wake")

    def __init__(
        self, tmp: Path | None, final: Path | None, record: ReceivedInstance, ids: dict[str, Any], sop: str
    ) -> None:
        self.tmp = tmp
        self.final = final
        self.record = record
        self.ids = ids
        self.sop = sop
        self.result: IngestResult | None = None
        #: Set when the instance is answered (``result`` set), or when its thread is to lead the next batch.
        self.wake = threading.Event()


#: The most instances one group commit takes (more wait for the next one, a few ms later).
GROUP_COMMIT_MAX = 64


class _GroupCommit:
    """Group commit of the renames, directory flushes and database records, led by the waiting threads.

    Every association (and STOW request) writes and flushes its instance's bytes itself, then queues the
    instance here. If no thread is committing, it becomes the leader: it takes everything queued at that
    moment, renames each file into place, flushes each touched directory once, records the whole batch in
    **one** database transaction (one commit, one flush of the database journal) and answers the batch; it
    repeats until its own instance is answered, then hands over to a waiting thread. The others wait. So a
    success status still means the bytes and the record are durable, N concurrent associations share one
    directory flush per series and one database commit instead of paying N of each, no association waits for
    the database's write lock (SQLite's busy handler sleeps in steps of milliseconds), and a lone association
    commits in its own thread (no hand-off to another thread and back for each instance).

    A file that cannot be renamed (disk full, I/O error) is answered with a failure and never recorded; a
    batch whose transaction fails is retried instance by instance, so one bad record fails only itself.
    """

    def __init__(self, spool: Spool) -> None:
        self._spool = spool
        self._lock = threading.Lock()
        self._queue: list[_Pending] = []
        self._leading = False

    def submit(self, pending: _Pending) -> IngestResult:
        # Each waiting thread sleeps on its own event and is woken once: when its instance is answered, or
        # when the leader hands the lead over to it. (A shared condition woke every waiter after every batch:
        # thread wake-ups are costly, on a virtual machine most of all.)
        with self._lock:
            self._queue.append(pending)
            lead = not self._leading
            self._leading = True
        if not lead:
            pending.wake.wait()
            if pending.result is not None:
                return pending.result
            # Handed the lead: our instance is still queued.
        try:
            while pending.result is None:
                with self._lock:
                    batch = self._queue[:GROUP_COMMIT_MAX]
                    del self._queue[:GROUP_COMMIT_MAX]
                self._run_batch(batch)  # answers (and wakes) every instance of the batch
        finally:
            with self._lock:
                if self._queue:
                    self._queue[0].wake.set()  # the next leader (its result still None)
                else:
                    self._leading = False
        return pending.result

    def close(self) -> None:
        """Nothing runs between calls: the leaders are the callers' own threads."""

    def _run_batch(self, batch: list[_Pending]) -> None:
        try:
            self._commit(batch)
        except Exception as exc:  # each waiter gets an answer, whatever happened
            LOGGER.error("group commit failed: %s", _one_line(exc))
            for p in batch:
                if p.result is None:
                    reason = f"processing failure: {type(exc).__name__}"
                    p.result = IngestResult(PROCESSING_FAILURE, reason, **p.ids)
        finally:
            for p in batch:
                if p.result is None:
                    p.result = IngestResult(PROCESSING_FAILURE, "processing failure", **p.ids)
                p.wake.set()

    def _commit(self, batch: list[_Pending]) -> None:
        spool = self._spool
        landed: list[_Pending] = []
        dirs: dict[Path, None] = {}  # an ordered set: each directory flushed once per batch
        for p in batch:
            if p.final is None or p.tmp is None:
                landed.append(p)  # accepted, nothing kept (discard policy)
                continue
            try:
                new_dirs = spool._new_dirs(p.final)
                os.replace(p.tmp, p.final)
            except OSError as exc:
                with contextlib.suppress(OSError):
                    p.tmp.unlink(missing_ok=True)
                p.result = spool._land_failed(exc, p.sop, p.ids)
                continue
            dirs[p.final.parent] = None
            for d in new_dirs:
                dirs[d.parent] = None
            landed.append(p)
        if spool.fsync:
            for d in dirs:
                _fsync_dir(d)
        if not landed:
            return
        try:
            news = self._record([p.record for p in landed])
        except Exception as exc:
            if len(landed) == 1:
                self._record_failed(landed[0], exc)
                return
            # Find the one that fails: the others must not pay for it.
            for p in landed:
                try:
                    (new,) = self._record([p.record])
                except Exception as one:
                    self._record_failed(p, one)
                else:
                    p.result = IngestResult(SUCCESS, None, path=p.final, duplicate=not new, **p.ids)
            return
        for p, new in zip(landed, news, strict=True):
            p.result = IngestResult(SUCCESS, None, path=p.final, duplicate=not new, **p.ids)

    def _record(self, records: list[ReceivedInstance]) -> list[bool]:
        sink = self._spool.sink
        many = getattr(sink, "record_instances", None)
        if many is not None:
            return list(many(records))
        return [sink.record_instance(r) for r in records]

    def _record_failed(self, p: _Pending, exc: Exception) -> None:
        # The file stays where it landed: the sender retries (failure status) and reindex_spool can record
        # it later, so nothing received is lost; the database holds nothing for it.
        LOGGER.error("database record failed for %s (file kept): %s", p.sop, _one_line(exc))
        p.result = IngestResult(
            OUT_OF_RESOURCES_DATABASE, "database unavailable, file kept; please retry", **p.ids
        )


def _one_line(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}"[:300]


def _iter_spooled(spool: Spool) -> list[tuple[Path, bool]]:
    out: list[tuple[Path, bool]] = []
    for base, ignored in ((spool.root, False), (spool.ignored_dir, True)):
        if not base.is_dir():
            continue
        for study_dir in sorted(base.iterdir()):
            if not study_dir.is_dir() or not is_valid_uid(study_dir.name):
                continue  # skips .tmp and ignored/
            for series_dir in sorted(study_dir.iterdir()):
                if series_dir.is_dir():
                    out.extend((p, ignored) for p in sorted(series_dir.glob("*.dcm")))
    return out


def reindex_spool(spool: Spool, *, stale_temp_age_s: float = 86_400.0) -> ReindexReport:
    """Record every spooled file in the sink again (after a database outage or a restore).

    Each file is re-read (header only) and passed to ``spool.sink.record_instance`` with source
    ``"reindex"``; the sink reports whether it was new. Temp files older than ``stale_temp_age_s`` were
    never confirmed to any sender (who therefore retried) and are removed.

    Parameters
    ----------
    spool
        The spool to sweep.
    stale_temp_age_s
        Age above which a temp file is considered abandoned.

    Returns
    -------
    ReindexReport
        Counts, and the files that could not be recorded with the reason (one line each).
    """
    report = ReindexReport()
    for path, ignored in _iter_spooled(spool):
        try:
            with open(path, "rb") as fp:
                read_preamble(fp, False)
                meta = _read_file_meta_info(fp)
                data = fp.read()
            ts = get_uid(meta, "TransferSyntaxUID")
            if ts is None:
                raise DatasetError("file meta has no Transfer Syntax UID")
            header = parse_header(data, ts)
            uids = [get_uid(header, k) for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")]
            sop_class = get_uid(header, "SOPClassUID")
            if sop_class is None or any(u is None or not is_valid_uid(u) for u in uids):
                raise DatasetError("missing or invalid UIDs")
            study, series, sop = (str(u) for u in uids)
            if spool.final_path(study, series, sop, ignored=ignored) != path:
                raise DatasetError("file is not where its UIDs say it belongs")
            try:
                attributes: Mapping[str, Any] = dict(spool.header_fn(header))
            except Exception:
                attributes = {}
            record = ReceivedInstance(
                study_instance_uid=study,
                series_instance_uid=series,
                sop_instance_uid=sop,
                sop_class_uid=sop_class,
                transfer_syntax_uid=ts,
                path=path,
                size_bytes=len(data),
                ignored=ignored,
                source="reindex",
                calling_ae_title=get_uid(meta, "SourceApplicationEntityTitle"),
                attributes=attributes,
                instance_number=_instance_number(header),
                image_position_patient=_floats(header.get("ImagePositionPatient"), 3),  # type: ignore[arg-type]
                image_orientation_patient=_floats(header.get("ImageOrientationPatient"), 6),  # type: ignore[arg-type]
            )
            if spool.sink.record_instance(record):
                report.recorded_new += 1
            else:
                report.already_known += 1
        except Exception as exc:
            reason = f"{type(exc).__name__}: {exc}"
            LOGGER.warning("reindex: cannot record %s: %s", path.name, reason)
            report.failed.append((path, reason))
    now = time.time()
    if spool.temp_dir.is_dir():
        for tmp in spool.temp_dir.iterdir():
            try:
                if tmp.is_file() and now - tmp.stat().st_mtime > stale_temp_age_s:
                    tmp.unlink()
                    report.stale_temp_removed += 1
            except OSError:
                continue
    return report
