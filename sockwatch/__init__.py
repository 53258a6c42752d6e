"""sockwatch: every TCP socket on a host, watched from inside the kernel with eBPF."""

__version__ = "0.1.0"
