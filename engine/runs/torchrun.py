"""`python -m engine.runs.torchrun ARGS`: PyTorch's launcher (``torch.distributed.run``, what `torchrun` runs) with
one change. When the rendezvous address is a loopback one (127.0.0.1, the default for the processes of one machine),
the store node 0 serves listens on that address alone, and gloo's sockets stay on the loopback interface too: torch
binds its store's server to every interface whatever the address (pytorch/pytorch#173909), which made a run on one
machine an unauthenticated key-value store any other machine on the network could reach while it lasted."""

from __future__ import annotations

import ipaddress
import os
import socket
import sys

def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _option(argv: list[str], name: str) -> str | None:
    for index, word in enumerate(argv):
        if word == name and index + 1 < len(argv):
            return argv[index + 1]
        if word.startswith(name + "="):
            return word.split("=", 1)[1]
    return None


def _listening(address: str, port: int) -> int:
    """A socket listening on ``address`` alone, as a file descriptor the store takes over."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    return socket.create_server((address, port), family=family, backlog=1024).detach()


def _store_on_loopback() -> None:
    """The static rendezvous' store, when it serves a loopback address, given a socket bound to that address (the
    store owns it from then on). torch before 2.8 takes a listening socket only in its older backend."""
    from torch.distributed.elastic.rendezvous import static_tcp_rendezvous

    real = static_tcp_rendezvous.TCPStore

    def store(host, port, world_size=None, is_master=False, *args, **kwargs):
        if not is_master or not is_loopback(host) or kwargs.get("master_listen_fd") is not None:
            return real(host, port, world_size, is_master, *args, **kwargs)
        address = "127.0.0.1" if host == "localhost" else host
        fd = _listening(address, port)
        try:
            return real(host, port, world_size, is_master, *args, **kwargs, master_listen_fd=fd)
        except NotImplementedError:  # "libuv TCPStore backend does not support initialization with an listen fd"
            os.close(fd)
        return real(host, port, world_size, is_master, *args, **kwargs, master_listen_fd=_listening(address, port),
                    use_libuv=False)

    static_tcp_rendezvous.TCPStore = store


def main() -> None:
    address = _option(sys.argv[1:], "--master_addr")
    if address is not None and is_loopback(address):
        if sys.platform.startswith("linux"):
            os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # Linux's name for the loopback interface
        _store_on_loopback()
    from torch.distributed.run import main as torchrun

    torchrun()


if __name__ == "__main__":
    main()
