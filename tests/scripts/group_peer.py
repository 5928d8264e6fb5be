"""Talks the consistency-group protocol (docs/PROTOCOL.md) to a member, as member 1 of group
"g", to check what a member does with a coordinator that falls silent and with strangers.

Usage: /usr/bin/python3 group_peer.py MODE HOST PORT SERVER_NAME CA CERT KEY [NBD_URI]
  silent:   HELLO, PREPARE, READY, then one write to NBD_URI (one of the member's volumes),
            timed, and nothing more: prints "held_ms N".
  stranger: HELLO and PREPARE (CERT "-": no certificate at all): prints "refused: WHY" when
            the member will not talk, "accepted ANSWER" when it does.
"""
import json
import socket
import ssl
import sys
import time

mode, host, port, server_name, ca, cert, key = sys.argv[1:8]
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.load_verify_locations(ca)
if cert != "-":
    ctx.load_cert_chain(cert, key)


def ask(f, msg):
    f.write((json.dumps(msg) + "\n").encode())
    f.flush()
    line = f.readline()
    if not line:
        raise EOFError("the member closed the connection")
    return json.loads(line)


try:
    raw = socket.create_connection((host, int(port)), timeout=5)
    s = ctx.wrap_socket(raw, server_hostname=server_name)
    f = s.makefile("rwb")
    w = ask(f, {"op": "hello", "group": "g", "id": 1})
    if w.get("op") != "welcome":
        raise EOFError("no welcome: %s" % w)
    if mode == "stranger":
        print("accepted", json.dumps(ask(f, {"op": "prepare", "point": 4097, "kind": "crash"})))
        sys.exit(0)
    import nbd

    h = nbd.NBD()
    h.connect_uri(sys.argv[8])
    r = ask(f, {"op": "prepare", "point": 8193, "kind": "crash"})
    if r.get("op") != "ready":
        raise SystemExit("no READY: %s" % r)
    t = time.monotonic()
    h.pwrite(b"\x07" * 4096, 1 << 20)
    print("held_ms %.1f" % ((time.monotonic() - t) * 1000))
    h.shutdown()
except (ssl.SSLError, OSError, EOFError) as e:
    print("refused:", e)
