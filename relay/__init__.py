"""migrelay: a relay for libvirt/QEMU live-migration traffic over one mutual-TLS port."""

__version__ = "0.1.0"
