"""The data path: connection ends (conn.py, rekey.py) and the pumps between them (pump.py)."""

from relay.datapath.conn import Conn, PlainConn, StreamTruncated, TlsConn
from relay.datapath.pump import Meter, StreamBroken, copy_pump, relay, splice_pump
from relay.datapath.rekey import RekeyConn, SwitchDeclined

__all__ = [
    "Conn",
    "Meter",
    "PlainConn",
    "RekeyConn",
    "StreamBroken",
    "StreamTruncated",
    "SwitchDeclined",
    "TlsConn",
    "copy_pump",
    "relay",
    "splice_pump",
]
