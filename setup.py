"""The one compiled part: the threaded data path's inner loops (relay/daemon/datapath/_hotloop.c).

optional=True: without a C compiler or Python's headers the install still succeeds and the
relay runs the same loops in Python (relay/daemon/datapath/threaded.py says which it uses).
Everything else about the package is in pyproject.toml.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "relay.daemon.datapath._hotloop",
            sources=["relay/daemon/datapath/_hotloop.c"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter", "-Werror=implicit-function-declaration"],
            optional=True,
        )
    ]
)
