"""The event-driven pynetdicom reactors (dicomnode.ingest.reactors) under real associations on loopback.

``StorageSCP.start`` installs them (process-wide, pynetdicom 3.0.x); these tests run pynetdicom SCUs in the
same process, so both ends of every association use the patched loops.
"""

from __future__ import annotations

import contextlib
import io
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pynetdicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE

from dicomnode.ingest import MemorySink, Spool, reactors
from dicomnode.ingest.scp import VERIFICATION, StorageSCP

pytestmark = pytest.mark.skipif(
    not pynetdicom.__version__.startswith("3.0."), reason="the reactor patch targets pynetdicom 3.0.x"
)


def ct(study: str, series: str, k: int) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.Modality = "CT"
    ds.InstanceNumber = k + 1
    ds.ImagePositionPatient = [0.0, 0.0, float(k)]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.Rows = ds.Columns = 8
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = np.full(64, k, dtype=np.int16).tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


@pytest.fixture
def node(tmp_path: Path) -> Iterator[tuple[StorageSCP, MemorySink]]:
    sink = MemorySink()
    scp = StorageSCP(Spool(tmp_path / "spool", sink, fsync=False), port=0)
    scp.start()
    try:
        yield scp, sink
    finally:
        scp.stop()


def scu() -> AE:
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(VERIFICATION)
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    return ae


def test_scp_start_installs_the_patch_once(node: tuple[StorageSCP, MemorySink]) -> None:
    assert reactors.event_driven_reactors_enabled()
    from pynetdicom.dul import DULServiceProvider

    run = DULServiceProvider.run_reactor
    assert reactors.enable_event_driven_reactors() is True
    assert DULServiceProvider.run_reactor is run, "a second call must not wrap the patch again"


#: sha256 of the source of the pynetdicom 3.0.4 functions the patch copies, wraps or stands in for.
PINNED_SOURCES = {
    "dul.DULServiceProvider.run_reactor": "61c299b9a930fb8740258c5518eed55255153ee890a826bed3d3483b42e1b110",
    "dul.DULServiceProvider.stop_dul": "6c62f0d0cd238affa1ee653ca676a100a29acb3e5f09bf32ab3e3fc9f8015198",
    "dul.DULServiceProvider.kill_dul": "d64f51d35ae851e0fa8fcd356521b0d3022914b9be5f243936bcafb9c2a8ff16",
    "dul.DULServiceProvider._read_pdu_data": "c5f07708cfb78a70d039d5f8eac54258e16b76a3a5ed016a9affaf4ed5aa9134",  # noqa: E501
    "dul.DULServiceProvider._is_transport_event": "a192323b769ecd4ab1349db0b819516a7dce2d42fc65d8bdec919984e5ebbab0",  # noqa: E501
    "dimse.DIMSEServiceProvider.send_msg": "bc8c411d046c95f8a31fc28ad24c1338630ea7acde3a7505eb54858f487f35b9",
    "association.Association._run_reactor": "304c896561674fdc8a8c3c87ee41d63ef83f16942a44b64e545dce4a5370c0d1",  # noqa: E501
    # What the direct P-DATA-TF path does in their place (DT-2) or mirrors (PDV items, C-STORE-RQ assembly).
    "fsm.DT_2": "6541e369216c2ab559df9a878a777934066282c0d8b7608c542127610c592230",
    "dul.DULServiceProvider._decode_pdu": "edd5454f6e2bc212c32c369d7c12c8ef3b19116c604857eb0b2f0ab53391f874",
    "pdu.P_DATA_TF._generate_items": "2dbfba812975c551f7543f2089a38228055561a985224932698261115dffa2e4",
    "dimse.DIMSEServiceProvider.receive_primitive": "533d17b6a815edee0cf264b62db31dd54ce9b3ec4c77c466a418bce0258ab584",  # noqa: E501
    "dimse_messages.DIMSEMessage.decode_msg": "4a6a0156bb315c5cadc7db2b977b77385716c0e9d281d6a10ab4d0418897a8b6",  # noqa: E501
    "dimse_messages.DIMSEMessage.message_to_primitive": "95c5a14dc7d2b04b2d3848e76745f1a27821f5905ee8e797a5935231df4d557d",  # noqa: E501
    # What serving a plain C-STORE in the network thread does in their place (_serve_store).
    "association.Association._serve_request": "b2b830a81a99d40aa450fb580e1b69c3b7d7111c603502f2c215561564bdd6ab",  # noqa: E501
    "service_class.StorageServiceClass.SCP": "726a71d3d6ae3e672bde2c9671d6579347f80f47255a6c58e72c6908dc3b0761",  # noqa: E501
    "fsm.DT_1": "ed12799eee42eb246b842f6c6cf7901bc596855afb0654597206ad4384ce6404",
    "transport.AssociationSocket.send": "30954262b82648fb3991f9ed998dd7b2fa2cb1a744ad5cbf6c81a16b9da420ae",
}


def _source_sha(where: str) -> str:
    """sha256 of a method's source (``module.Class.name``) as pynetdicom's installed file has it (not the
    patched attribute)."""
    import ast
    import hashlib
    import importlib

    module, *owner, name = where.split(".")  # module.Class.name, or module.name for a module's function
    path = Path(importlib.import_module(f"pynetdicom.{module}").__file__ or "")
    text = path.read_text(encoding="utf-8")
    body = ast.parse(text).body
    if owner:
        body = next(n for n in body if isinstance(n, ast.ClassDef) and n.name == owner[0]).body
    fn = next(n for n in body if isinstance(n, ast.FunctionDef) and n.name == name)
    return hashlib.sha256((ast.get_source_segment(text, fn) or "").encode()).hexdigest()


def test_patch_is_pinned_to_the_installed_pynetdicom() -> None:
    """The reactor loops are copies of pynetdicom 3.0.4's private ones: an upgrade must fail here until the
    copies in dicomnode/ingest/reactors.py are compared with the new loops (then update both pins)."""
    assert pynetdicom.__version__ == reactors.SUPPORTED_PYNETDICOM
    changed = [k for k, sha in PINNED_SOURCES.items() if _source_sha(k) != sha]
    assert not changed, f"pynetdicom changed what the reactor patch copies: {changed}"


def test_other_pynetdicom_versions_keep_the_stock_loops(monkeypatch: pytest.MonkeyPatch) -> None:
    installed: list[bool] = []
    monkeypatch.setattr(reactors, "_REACTORS_PATCHED", False)
    monkeypatch.setattr(reactors, "_install_reactors", lambda: installed.append(True))
    monkeypatch.setattr(pynetdicom, "__version__", "3.1.0")
    assert reactors.enable_event_driven_reactors() is False
    assert not installed and not reactors.event_driven_reactors_enabled()


def test_many_synchronous_requests_on_one_association_all_answered(
    node: tuple[StorageSCP, MemorySink],
) -> None:
    # Back-to-back requests are where a reactor that took the SCU's response off the queue (the pause race
    # the patch closes) would surface as a missing status.
    scp, sink = node
    assoc = scu().associate("127.0.0.1", scp.port, ae_title="DICOMNODE")
    assert assoc.is_established
    try:
        statuses = [assoc.send_c_echo() for _ in range(150)]
        study, series = generate_uid(), generate_uid()
        datasets = [ct(study, series, k) for k in range(30)]
        stored = [assoc.send_c_store(ds) for ds in datasets]
    finally:
        assoc.release()
    assert assoc.is_released
    assert [int(s.Status) for s in statuses] == [0] * 150
    assert [int(s.Status) for s in stored] == [0] * 30
    assert {str(ds.SOPInstanceUID) for ds in datasets} == set(sink.instances)
    for ds in datasets:
        path = sink.instances[str(ds.SOPInstanceUID)].path
        assert path is not None and path.is_file()


def test_twenty_concurrent_associations(node: tuple[StorageSCP, MemorySink]) -> None:
    scp, sink = node
    scp_limit = scp.ae
    assert scp_limit is not None
    scp_limit.maximum_associations = 25
    errors: list[str] = []
    sent: list[str] = []
    lock = threading.Lock()
    barrier = threading.Barrier(20)

    def sender(k: int) -> None:
        assoc = scu().associate("127.0.0.1", scp.port, ae_title="DICOMNODE")
        if not assoc.is_established:
            with lock:
                errors.append(f"{k}: not established")
            return
        try:
            barrier.wait(timeout=60)  # all twenty open at once
            study, series = generate_uid(), generate_uid()
            for i in range(5):
                ds = ct(study, series, i)
                status = assoc.send_c_store(ds)
                with lock:
                    if not status or int(status.Status) != 0:
                        errors.append(f"{k}/{i}: {status}")
                    else:
                        sent.append(str(ds.SOPInstanceUID))
        finally:
            assoc.release()

    threads = [threading.Thread(target=sender, args=(k,)) for k in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors
    assert len(sent) == 100 and set(sent) == set(sink.instances)


def test_abort_and_garbage_leave_the_scp_serving(node: tuple[StorageSCP, MemorySink]) -> None:
    scp, sink = node
    # Peer aborts in the middle of an association.
    assoc = scu().associate("127.0.0.1", scp.port, ae_title="DICOMNODE")
    assert assoc.is_established
    assert int(assoc.send_c_echo().Status) == 0
    assoc.abort()
    assert assoc.is_aborted
    # Bytes that are not a PDU, then a connection that just closes.
    with socket.create_connection(("127.0.0.1", scp.port), timeout=5) as s:
        s.sendall(b"\xff" * 64 + b"GET / HTTP/1.0\r\n\r\n")
        s.settimeout(5)
        with contextlib.suppress(OSError):
            s.recv(100)  # the SCP answers an A-ABORT or closes
    with socket.create_connection(("127.0.0.1", scp.port), timeout=5):
        pass
    # Still serving, with a normal release.
    ds = ct(generate_uid(), generate_uid(), 0)
    again = scu().associate("127.0.0.1", scp.port, ae_title="DICOMNODE")
    assert again.is_established
    assert int(again.send_c_store(ds).Status) == 0
    again.release()
    assert again.is_released
    assert str(ds.SOPInstanceUID) in sink.instances


def test_stop_closes_the_port_and_the_network_timeout_still_fires(tmp_path: Path) -> None:
    # The capped waits must still let pynetdicom's timers run: an idle SCU association whose peer went away
    # ends by its network timeout (pynetdicom's server shutdown does not notify open peers).
    scp = StorageSCP(Spool(tmp_path / "spool", MemorySink(), fsync=False), port=0)
    scp.start()
    port = scp.port
    ae = scu()
    ae.network_timeout = 1
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOMNODE")
    assert assoc.is_established
    scp.stop()
    late = scu().associate("127.0.0.1", port, ae_title="DICOMNODE")
    assert not late.is_established
    deadline = time.monotonic() + 30
    while assoc.is_established and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not assoc.is_established


def test_idle_association_waits_instead_of_polling(
    node: tuple[StorageSCP, MemorySink], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Each idle DUL reactor wakes at most every _MAX_IDLE_WAIT_S (50 ms) instead of every 1 ms: count the
    # waits of the two reactors (SCU and SCP side) over an idle half second.
    scp, _ = node
    calls = 0
    real_wait = reactors._dul_wait

    def counting(dul: object, waker: reactors._Waker) -> None:
        nonlocal calls
        calls += 1
        real_wait(dul, waker)

    assoc = scu().associate("127.0.0.1", scp.port, ae_title="DICOMNODE")
    assert assoc.is_established
    try:
        monkeypatch.setattr(reactors, "_dul_wait", counting)
        time.sleep(0.5)
        monkeypatch.undo()
        assert int(assoc.send_c_echo().Status) == 0
    finally:
        assoc.release()
    # Polling every 1 ms would be ~1000 waits for two reactors; 50 ms waits give ~20.
    assert calls < 200, calls


@pytest.mark.parametrize(
    ("sop_class", "sop", "status", "msg_id"),
    [
        (CTImageStorage, "1.2.3.4.5", 0x0000, 7),  # odd-length UIDs: NUL padding
        ("1.2.840.10008.5.1.4.1.1.4", "1.2.3.4.56", 0xB000, 65535),  # even, a warning status
        (CTImageStorage, generate_uid(), 0xA700, 1),
    ],
)
def test_the_direct_c_store_response_is_what_pynetdicom_would_send(
    sop_class: str, sop: str, status: int, msg_id: int
) -> None:
    from pynetdicom.dimse_messages import C_STORE_RSP
    from pynetdicom.dimse_primitives import C_STORE
    from pynetdicom.dsutils import encode

    rsp = C_STORE()
    rsp.MessageIDBeingRespondedTo = msg_id
    rsp.AffectedSOPClassUID = sop_class
    rsp.AffectedSOPInstanceUID = sop
    rsp.Status = status
    stock = C_STORE_RSP()
    stock.primitive_to_message(rsp)
    assert reactors.store_response_bytes(rsp) == encode(stock.command_set, True, True)
    rsp.ErrorComment = "out of resources"
    assert reactors.store_response_bytes(rsp) is None, "a response with a comment takes the stock path"


def test_read_ahead_takes_pdus_split_or_several_per_read() -> None:
    # Plain sockets are read through a buffer: a PDU cut across reads is put together, several PDUs in one
    # read come out one by one, a PDU larger than the buffer grows it, and a peer that closes mid-PDU or
    # stalls past the deadline is a failed fill (the reactor then reports Evt17).
    a, b = socket.socketpair()
    try:
        ahead = reactors._ReadAhead()
        deadline = time.monotonic() + 5
        first, second = b"\x04\x00" + bytes(4) + b"x" * 10, b"\x04\x00" + bytes(4) + b"y" * 20
        a.sendall(first + second[:3])
        assert ahead.fill(b, len(first), deadline)
        assert bytes(ahead.take(len(first))) == first
        assert len(ahead) == 3
        sender = threading.Thread(target=lambda: (time.sleep(0.05), a.sendall(second[3:])))
        sender.start()
        assert ahead.fill(b, len(second), deadline)
        sender.join()
        assert bytes(ahead.take(len(second))) == second and len(ahead) == 0
        big = bytes(range(256)) * (3 * reactors._READ_CHUNK // 256)
        sender = threading.Thread(target=a.sendall, args=(big,))
        sender.start()
        assert ahead.fill(b, len(big), deadline)
        sender.join()
        assert bytes(ahead.take(len(big))) == big
        a.sendall(b"zz")
        assert not ahead.fill(b, 4, time.monotonic() + 0.1), "stalled past the deadline"
        a.close()
        assert not ahead.fill(b, 4, time.monotonic() + 5), "closed mid-PDU"
    finally:
        a.close()
        b.close()


def _store_command(**extra: object) -> tuple[bytes, object]:
    """A C-STORE-RQ command set as pynetdicom encodes it, and the request primitive it came from."""
    from pynetdicom.dimse_messages import C_STORE_RQ
    from pynetdicom.dimse_primitives import C_STORE
    from pynetdicom.dsutils import encode

    req = C_STORE()
    req.MessageID = 4711
    req.AffectedSOPClassUID = CTImageStorage
    req.AffectedSOPInstanceUID = generate_uid()
    req.Priority = 1
    req.DataSet = io.BytesIO(b"\x00" * 8)  # a data set follows (Command Data Set Type not 0x0101)
    for key, value in extra.items():
        setattr(req, key, value)
    msg = C_STORE_RQ()
    msg.primitive_to_message(req)
    return encode(msg.command_set, True, True), req


def test_a_plain_c_store_command_is_read_as_pynetdicom_reads_it() -> None:
    from pynetdicom.dimse_messages import DIMSEMessage
    from pynetdicom.pdu_primitives import P_DATA

    command, _ = _store_command()
    store = reactors._StoreRequest.decode(memoryview(command), 5)
    assert store is not None
    lean = store.primitive
    stock_msg = DIMSEMessage()
    pdata = P_DATA()
    pdata.presentation_data_value_list = [[5, b"\x03" + command], [5, b"\x02" + b"\x00" * 8]]
    assert stock_msg.decode_msg(pdata)
    stock = stock_msg.message_to_primitive()
    for key in ("MessageID", "AffectedSOPClassUID", "AffectedSOPInstanceUID", "Priority"):
        assert getattr(lean, key) == getattr(stock, key), key
    assert type(lean.AffectedSOPClassUID) is type(stock.AffectedSOPClassUID)
    assert lean.MoveOriginatorApplicationEntityTitle is None and lean.MoveOriginatorMessageID is None
    # the data set is attached once received (a request queued for pynetdicom gets it as a BytesIO)
    store.data.write(memoryview(b"\x00" * 8))
    lean.DataSet = store.to_bytesio()
    assert lean._context_id == 5 and lean.is_valid_request
    assert lean.DataSet.getvalue() == b"\x00" * 8


def test_other_command_sets_are_left_to_pynetdicom() -> None:
    from pynetdicom.dimse_messages import C_ECHO_RQ
    from pynetdicom.dimse_primitives import C_ECHO
    from pynetdicom.dsutils import encode

    moved, _ = _store_command(MoveOriginatorApplicationEntityTitle="MOVER", MoveOriginatorMessageID=3)
    assert reactors._StoreRequest.decode(memoryview(moved), 1) is None, "a Move Originator"
    echo = C_ECHO()
    echo.MessageID = 1
    echo.AffectedSOPClassUID = VERIFICATION
    msg = C_ECHO_RQ()
    msg.primitive_to_message(echo)
    assert reactors._StoreRequest.decode(memoryview(encode(msg.command_set, True, True)), 1) is None
    command, req = _store_command()
    uid = str(req.AffectedSOPInstanceUID).encode()
    broken = command.replace(uid, b"1.2.3.x" + uid[7:])
    assert reactors._StoreRequest.decode(memoryview(broken), 1) is None, "a UID that is not digits and dots"
    assert reactors._StoreRequest.decode(memoryview(command[:-3]), 1) is None, "cut short"


def test_a_broken_pdv_is_garbage_and_the_scp_keeps_serving(node: tuple[StorageSCP, MemorySink]) -> None:
    import struct

    scp, sink = node
    assoc = scu().associate("127.0.0.1", scp.port, ae_title="DICOMNODE")
    assert assoc.is_established
    sock = assoc.dul.socket.socket
    assert sock is not None
    # A P-DATA-TF whose only PDV item says 1 byte: no room for the message control header.
    sock.sendall(b"\x04\x00" + struct.pack(">L", 5) + struct.pack(">L", 1) + b"\x01")
    end = time.monotonic() + 10
    while not assoc.is_aborted and time.monotonic() < end:
        time.sleep(0.05)
    assert assoc.is_aborted, "the SCP answers an A-ABORT"
    ds = ct(generate_uid(), generate_uid(), 0)
    again = scu().associate("127.0.0.1", scp.port, ae_title="DICOMNODE")
    assert again.is_established
    assert int(again.send_c_store(ds).Status) == 0
    again.release()
    assert str(ds.SOPInstanceUID) in sink.instances


def test_a_handler_on_pdu_events_takes_pynetdicoms_path(node: tuple[StorageSCP, MemorySink]) -> None:
    from pynetdicom import evt

    scp, sink = node
    server = scp._server
    assert server is not None
    seen: list[int] = []
    server.bind(evt.EVT_PDU_RECV, lambda event: seen.append(event.pdu.pdu_type))
    assoc = scu().associate("127.0.0.1", scp.port, ae_title="DICOMNODE")
    assert assoc.is_established
    study, series = generate_uid(), generate_uid()
    datasets = [ct(study, series, k) for k in range(3)]
    try:
        assert [int(assoc.send_c_store(ds).Status) for ds in datasets] == [0, 0, 0]
    finally:
        assoc.release()
    assert seen.count(0x04) >= 3, "every P-DATA-TF went through pynetdicom's decode and its event"
    assert {str(ds.SOPInstanceUID) for ds in datasets} <= set(sink.instances)


def test_a_dul_built_before_the_patch_can_still_be_killed(node: tuple[StorageSCP, MemorySink]) -> None:
    # An association already open when the patch was installed runs pynetdicom's own loop and has no waker;
    # the patched kill_dul (reached through the class) must not raise in its reactor thread.
    from pynetdicom.dul import DULServiceProvider

    dul = DULServiceProvider.__new__(DULServiceProvider)
    dul._kill_thread = False
    dul.kill_dul()
    assert dul._kill_thread


def _serving_threads(scp: StorageSCP) -> list[str]:
    """The kind of thread each instance is stored in: 'dul' (the network thread) or 'association'."""
    from pynetdicom.dul import DULServiceProvider

    kinds: list[str] = []

    def note(result: object) -> None:
        thread = threading.current_thread()
        kinds.append("dul" if isinstance(thread, DULServiceProvider) else "association")

    scp.spool.on_result = note
    return kinds


def test_a_plain_c_store_is_served_in_the_network_thread(node: tuple[StorageSCP, MemorySink]) -> None:
    # No hand-off to the association's thread and back: the DUL thread that read the data set stores it and
    # sends the response; the SCU sees the same statuses as on pynetdicom's path, the refusal's comment too.
    scp, sink = node
    kinds = _serving_threads(scp)
    assoc = scu().associate("127.0.0.1", scp.port, ae_title="DICOMNODE")
    assert assoc.is_established
    study, series = generate_uid(), generate_uid()
    datasets = [ct(study, series, k) for k in range(5)]
    uidless = ct(study, series, 9)
    del uidless.SeriesInstanceUID
    try:
        statuses = [assoc.send_c_store(ds) for ds in datasets]
        refused = assoc.send_c_store(uidless)
        echo = assoc.send_c_echo()
    finally:
        assoc.release()
    assert [int(s.Status) for s in statuses] == [0] * 5
    assert int(refused.Status) == 0xC211 and refused.ErrorComment == "missing SeriesInstanceUID"
    assert int(echo.Status) == 0
    assert kinds == ["dul"] * 6
    assert {str(ds.SOPInstanceUID) for ds in datasets} == set(sink.instances)


@pytest.mark.parametrize("event_name", ["EVT_DIMSE_SENT", "EVT_PDU_SENT", "EVT_DATA_SENT"])
def test_a_handler_on_sent_events_keeps_the_association_thread(
    node: tuple[StorageSCP, MemorySink], event_name: str
) -> None:
    from pynetdicom import evt

    scp, sink = node
    server = scp._server
    assert server is not None
    seen: list[object] = []
    server.bind(getattr(evt, event_name), lambda event: seen.append(event))
    kinds = _serving_threads(scp)
    assoc = scu().associate("127.0.0.1", scp.port, ae_title="DICOMNODE")
    assert assoc.is_established
    ds = ct(generate_uid(), generate_uid(), 0)
    try:
        assert int(assoc.send_c_store(ds).Status) == 0
    finally:
        assoc.release()
    assert kinds == ["association"], "pynetdicom's path, so the bound handler sees the response"
    assert seen and str(ds.SOPInstanceUID) in sink.instances


def test_the_direct_response_pdu_is_what_pynetdicom_would_send() -> None:
    from pynetdicom.pdu import P_DATA_TF
    from pynetdicom.pdu_primitives import P_DATA

    command = reactors.store_response(9, CTImageStorage, "1.2.3.4.5", 0)
    assert command is not None
    primitive = P_DATA()
    primitive.presentation_data_value_list = [[7, b"\x03" + command]]
    stock = P_DATA_TF()
    stock.from_primitive(primitive)
    assert reactors.command_pdu(command, 7) == stock.encode()
    assert reactors.store_response(9, CTImageStorage, "1.2.3.4.5", Dataset()) is None, "not a plain status"
    assert reactors.store_response(9, CTImageStorage, "1.2.3.4.5", 0x10000) is None


def test_the_data_set_buffer_is_copied_once_and_views_stay_valid() -> None:
    buffer = reactors._DataSetBuffer(capacity=16)
    buffer.write(memoryview(b"0123456789"))
    first = buffer.view()
    buffer.write(memoryview(b"abcdefghij"))  # grows: a new buffer, the old view still reads its bytes
    assert bytes(first) == b"0123456789"
    assert bytes(buffer.view()) == b"0123456789abcdefghij" and len(buffer.buf) == 32
    request = reactors._StoreRequest.decode(memoryview(_store_command()[0]), 1, buffer)
    assert request is not None and request.data is buffer and buffer.size == 0, "reused, emptied"
    buffer.write(memoryview(b"xyz"))
    queued = request.to_bytesio()
    buffer.write(memoryview(b"!"))
    assert queued.getvalue() == b"xyz", "a request queued for pynetdicom keeps its own copy"


def test_an_association_reuses_its_buffer_but_not_a_large_one(node: tuple[StorageSCP, MemorySink]) -> None:
    from pynetdicom.dul import DULServiceProvider

    scp, sink = node
    kept: list[object] = []  # the buffer the association held when each instance arrived

    def note(result: object) -> None:
        thread = threading.current_thread()
        assert isinstance(thread, DULServiceProvider)
        kept.append(thread.__dict__.get("_dn_buffer"))

    scp.spool.on_result = note
    assoc = scu().associate("127.0.0.1", scp.port, ae_title="DICOMNODE")
    assert assoc.is_established
    study, series = generate_uid(), generate_uid()
    big = ct(study, series, 2)
    big.Rows = big.Columns = 2100  # 8.8 MB: more than an association keeps for its next request
    big.PixelData = np.zeros(2100 * 2100, dtype=np.int16).tobytes()
    datasets = [ct(study, series, 0), ct(study, series, 1), big, ct(study, series, 3)]
    try:
        statuses = [assoc.send_c_store(ds) for ds in datasets]
    finally:
        assoc.release()
    assert [int(s.Status) for s in statuses] == [0] * 4
    assert kept[0] is None and kept[1] is not None and kept[2] is kept[1], "the first buffer, reused"
    assert kept[3] is None, "the buffer the large data set grew was let go"
    assert {str(ds.SOPInstanceUID) for ds in datasets} == set(sink.instances)
    stored = sink.instances[str(big.SOPInstanceUID)].path
    assert stored is not None and stored.stat().st_size > 2100 * 2100 * 2


def test_a_slow_store_outlasting_the_network_timeout_is_still_answered(tmp_path: Path) -> None:
    # Served in the network thread, the association reactor is free to look at the idle timer meanwhile: it
    # must not take a slow commit (a database busy for longer than the network timeout) for an idle peer.
    class SlowSink(MemorySink):
        def record_instance(self, instance: object) -> bool:
            time.sleep(1.6)
            return super().record_instance(instance)  # type: ignore[arg-type]

    sink = SlowSink()
    scp = StorageSCP(Spool(tmp_path / "spool", sink, fsync=False), port=0, network_timeout=1.0)
    scp.start()
    try:
        assoc = scu().associate("127.0.0.1", scp.port, ae_title="DICOMNODE")
        assert assoc.is_established
        ds = ct(generate_uid(), generate_uid(), 0)
        status = assoc.send_c_store(ds)
        assert status is not None and int(status.Status) == 0
        assert assoc.is_established, "not aborted for a network timeout while storing"
        assoc.release()
    finally:
        scp.stop()
    assert str(ds.SOPInstanceUID) in sink.instances
