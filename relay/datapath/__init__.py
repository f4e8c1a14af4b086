"""The data path: connection ends (conn.py) and the pumps between them (pump.py)."""

from relay.datapath.conn import Conn, PlainConn, StreamTruncated, TlsConn
from relay.datapath.pump import Meter, StreamBroken, copy_pump, relay, splice_pump

__all__ = [
    "Conn",
    "Meter",
    "PlainConn",
    "StreamBroken",
    "StreamTruncated",
    "TlsConn",
    "copy_pump",
    "relay",
    "splice_pump",
]
