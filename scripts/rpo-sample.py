"""Samples a tracker's head and a shipper's acked sequence number every 100 ms (from the
benchmarks): the RPO is the age of the oldest write not yet durable at the destination, the
time since the first sample whose head passed what is acked now. Stops once the file
WORK/done exists and the shipper has caught up; prints JSON: max RPO (s), record bytes shipped,
bytes on the wire per byte, shipper CPU seconds per GB, and bucket PUT requests meanwhile.
Usage: python3 scripts/rpo-sample.py WORK SHIPPER_PID (sockets WORK/tracker.sock, WORK/shipper.sock)."""
import json
import socket
import sys
import time

work, spid = sys.argv[1], sys.argv[2]


def status(path):
    s = socket.socket(socket.AF_UNIX)
    s.connect(path)
    s.sendall(b'{"cmd":"status"}\n')
    d = b''
    while not d.endswith(b'\n'):
        d += s.recv(1 << 20)
    return json.loads(d)['status']


def cpu():
    f = open(f'/proc/{spid}/stat').read().rsplit(')', 1)[1].split()
    return (int(f[11]) + int(f[12])) / 100


def ship():
    return status(work + '/shipper.sock')['volumes'][0]


s0, c0 = ship(), cpu()
seen = []  # (time, head) samples whose head is not acked yet
rpo = 0.0
while True:
    now = time.time()
    head = status(work + '/tracker.sock')['volumes'][0]['journal']['head_seq']
    v = ship()
    seen.append((now, head))
    acked = v['acked_seq']
    pending = [(t, h) for t, h in seen if h > acked]
    if pending:
        rpo = max(rpo, now - pending[0][0])
    seen = pending or [(now, head)]
    try:
        open(work + '/done')
        if acked == head:
            break
    except FileNotFoundError:
        pass
    time.sleep(0.1)
s1, c1 = ship(), cpu()
shipped = s1['bytes_shipped'] - s0['bytes_shipped']
sent = s1['bytes_sent'] - s0['bytes_sent']
print(json.dumps({
    'rpo': rpo,
    'shipped': shipped,
    'wire': sent / max(shipped, 1),
    'cpu_per_gb': (c1 - c0) / max(shipped / 1e9, 1e-9),
    'puts': (s1.get('bucket_puts') or 0) - (s0.get('bucket_puts') or 0),
}))
