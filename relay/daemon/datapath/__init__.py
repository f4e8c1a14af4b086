"""The data path: connection ends (conn.py, rekey.py) and the pumps between them (pump.py)."""

from relay.daemon.datapath.conn import Conn, PlainConn, StreamTruncated, TlsConn
from relay.daemon.datapath.pump import Meter, StreamBroken, bridge, copy_pump, splice_pump
from relay.daemon.datapath.rekey import RekeyConn, SwitchDeclined

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
]
