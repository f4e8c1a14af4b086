"""`migrelay bench`: migrelay against direct sockets, socat, stunnel and HAProxy, in one run.

setups.py     the forwarder pairs under test (each: an entry socket -> ... -> a sink socket)
load.py       the load generator and sink (separate processes: `python -m relay.tools.bench.load`)
run.py        the harness: interleaved runs, CPU/RSS from /proc, medians, table, JSON, plot
migration.py  real QEMU migrations through the pairs: precopy, and postcopy of a page-reading guest
flood.py      the slow-connection flood beside a stream
"""
