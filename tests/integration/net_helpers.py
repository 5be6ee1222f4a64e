"""For tests whose guest talks TCP to the host (in the `netns` fixture's namespace, tests/conftest.py): a server that
sends N random bytes on port 5001 and hashes what it receives on port 5002 (for `python3 -c NET_SERVER ADDR N`).
Once it has N bytes on 5002 it answers "received" and closes: busybox's nc keeps reading after its input ends, so
the guest waits for that answer instead of powering off while its last segments are still in flight."""
from __future__ import annotations

import textwrap

NET_SERVER = textwrap.dedent("""
    import hashlib, os, socket, sys
    N = int(sys.argv[2])
    data = os.urandom(1 << 20) * (N >> 20)
    print("sentsum=" + hashlib.sha256(data).hexdigest(), flush=True)
    def listen(port):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((sys.argv[1], port))
        s.listen(1)
        s.settimeout(600)
        c, _ = s.accept()
        c.settimeout(600)
        return c
    c = listen(5001)
    c.sendall(data)
    c.close()
    c = listen(5002)
    h, n = hashlib.sha256(), 0
    while n < N:
        b = c.recv(1 << 20)
        if not b:
            break
        h.update(b)
        n += len(b)
    print("recvlen=%d" % n, flush=True)
    print("recvsum=" + h.hexdigest(), flush=True)
    c.sendall(b"received\\n")
    c.close()
""")

