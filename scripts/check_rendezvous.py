"""python scripts/check_rendezvous.py HOST PORT TIMEOUT_S: exits 0 when HOST can host or serve the
rendezvous (it is this machine, or it answers at PORT, even by refusing: the store may not be up
yet), else prints why in one line and exits 1. Run by train_multi_node.sh before torchrun, which
would otherwise wait out its own rendezvous timeout."""
import signal
import socket
import sys


def _timed_out(signum, frame):
    raise TimeoutError


def main() -> int:
    host, port, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    signal.signal(signal.SIGALRM, _timed_out)
    signal.setitimer(signal.ITIMER_REAL, timeout)  # getaddrinfo has no timeout of its own
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except TimeoutError:
        return _fail(f"cannot resolve {host} within {timeout:g} s")
    except socket.gaierror as e:
        return _fail(f"cannot resolve {host} ({e.strerror})")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    reason = "no address"
    for family, kind, proto, _, address in addresses:
        with socket.socket(family, kind, proto) as s:
            try:
                s.bind((address[0], 0))  # binds only to an address of this machine
                return 0
            except OSError:
                pass
        with socket.socket(family, kind, proto) as s:
            s.settimeout(timeout)
            try:
                s.connect(address)
                return 0
            except ConnectionRefusedError:
                return 0  # the host answered; its store is not listening yet
            except socket.timeout:
                reason = f"no answer within {timeout:g} s"
            except OSError as e:  # no route, network unreachable, ...
                reason = e.strerror or str(e)
    return _fail(f"{host}:{port} unreachable ({reason})")


def _fail(message: str) -> int:
    print(message)
    return 1


if __name__ == "__main__":
    sys.exit(main())
