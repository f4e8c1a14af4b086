# The compiled inner loops (_hotloop.c). Outcome tuple: (outcome, moved, ssl_ret, ssl_error, errno, short_read).
from array import array
from typing import Final

ABI: Final[int]
EOF: Final[int]
STOP: Final[int]
CHAIN: Final[int]
TLS: Final[int]
SSL_ERROR_SYSCALL: Final[int]

Outcome = tuple[int, int, int, int, int, int]

class Lock:
    def __enter__(self) -> bool: ...
    def __exit__(self, *exc: object) -> bool: ...

def init(ssl_read: int, ssl_write: int, ssl_get_error: int, err_clear_error: int, /) -> None: ...
def splice(
    src: int, dst: int, pipe_r: int, pipe_w: int, pipe_size: int, wake_fd: int, flags: bytearray, counter: array[int], /
) -> Outcome: ...
def from_tls(
    dst: int,
    ssl: int,
    lock: Lock,
    ssl_fd: int,
    wake_fd: int,
    flags: bytearray,
    counter: array[int],
    buf: memoryview,
    budget: int,
    short_read: bool,
    /,
) -> Outcome: ...
def to_tls(
    src: int,
    ssl: int,
    lock: Lock,
    ssl_fd: int,
    wake_fd: int,
    flags: bytearray,
    counter: array[int],
    buf: memoryview,
    budget: int,
    pokable: bool,
    /,
) -> Outcome: ...
