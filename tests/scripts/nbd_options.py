"""Option-level NBD checks with libnbd: LIST, INFO, GO, ABORT, meta contexts, and
connections without structured replies or without NO_ZEROES.

Usage: nbdsh -n -c "import sys; sys.argv = [...]; exec(...)", or /usr/bin/python3 nbd_options.py SOCKET EXPORT
"""
import errno
import sys

import nbd

sock, export = sys.argv[1], sys.argv[2]

def handle(**kw):
    h = nbd.NBD()
    h.set_opt_mode(True)
    if kw.get("no_structured"):
        h.set_request_structured_replies(False)
    if kw.get("no_zeroes_flag") is False:
        h.set_handshake_flags(nbd.HANDSHAKE_FLAG_FIXED_NEWSTYLE)
    h.connect_unix(sock)
    return h

# LIST names the export; ABORT ends the negotiation cleanly.
h = handle()
names = []
h.opt_list(lambda name, desc: names.append(name) or 0)
assert export in names, names
h.opt_abort()
assert h.aio_is_closed()

# INFO on an unknown export fails, and the negotiation goes on.
h = handle()
h.set_export_name("no-such-volume")
try:
    h.opt_info()
    raise AssertionError("INFO on an unknown export succeeded")
except nbd.Error:
    pass
h.set_export_name(export)
h.opt_info()
assert h.get_size() > 0
# LIST_META_CONTEXT shows base:allocation.
ctx = []
h.opt_list_meta_context(lambda name: ctx.append(name) or 0)
assert nbd.CONTEXT_BASE_ALLOCATION in ctx, ctx
# GO on an unknown export fails, GO on the right one enters transmission.
h.set_export_name("no-such-volume")
try:
    h.opt_go()
    raise AssertionError("GO on an unknown export succeeded")
except nbd.Error:
    pass
h.set_export_name(export)
h.opt_go()
assert h.pread(512, 0) is not None
h.shutdown()

# Without structured replies: plain replies, no DF, no block status, I/O works.
h = handle(no_structured=True)
h.set_export_name(export)
h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
h.opt_go()
assert not h.get_structured_replies_negotiated()
assert not h.can_df()
assert not h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
h.pwrite(b"s" * 4096, 8192)
assert h.pread(4096, 8192) == b"s" * 4096
h.set_strict_mode(0)
try:
    h.pread(4096, h.get_size())
    raise AssertionError("past-EOF read succeeded")
except nbd.Error as e:
    assert e.errnum == errno.EINVAL, e
assert h.pread(4096, 8192) == b"s" * 4096
h.shutdown()

# Without NO_ZEROES in the client flags.
h = handle(no_zeroes_flag=False)
h.set_export_name(export)
h.opt_go()
assert h.get_handshake_flags() & nbd.HANDSHAKE_FLAG_NO_ZEROES == 0
assert h.pread(4096, 8192) == b"s" * 4096
h.shutdown()
print("options ok")
