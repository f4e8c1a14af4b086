"""The data path: connection ends (conn.py, rekey.py) and the pumps between them (pump.py as trio
tasks, threaded.py in a thread per direction)."""

from relay.daemon.datapath.conn import Conn, PlainConn, StreamTruncated, TlsConn
from relay.daemon.datapath.pump import Meter, StreamBroken, bridge, copy_pump, splice_pump
from relay.daemon.datapath.rekey import RekeyConn, SwitchDeclined
from relay.daemon.datapath.threaded import threaded_bridge

__all__ = [
    "Conn",
    "Meter",
    "PlainConn",
    "RekeyConn",
    "StreamBroken",
    "StreamTruncated",
    "SwitchDeclined",
    "TlsConn",
    "bridge",
    "copy_pump",
    "splice_pump",
    "threaded_bridge",
]
