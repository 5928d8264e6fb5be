"""Creates a container on Azurite (the Azure Blob emulator) with a SharedKey-signed request,
using only the standard library: az_container.py PORT CONTAINER."""

import base64
import email.utils
import hashlib
import hmac
import sys
import urllib.error
import urllib.request

ACCOUNT = "devstoreaccount1"
# The emulator's well-known account key (public, the same in every Azurite).
KEY = ("Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==")
VERSION = "2021-08-06"


def main():
    port, container = sys.argv[1], sys.argv[2]
    date = email.utils.formatdate(usegmt=True)
    headers = f"x-ms-date:{date}\nx-ms-version:{VERSION}\n"
    resource = f"/{ACCOUNT}/{ACCOUNT}/{container}\nrestype:container"
    # VERB, then 11 standard headers (all empty here), then the x-ms-* headers and resource.
    to_sign = "PUT\n" + "\n" * 11 + headers + resource
    sig = base64.b64encode(
        hmac.new(base64.b64decode(KEY), to_sign.encode(), hashlib.sha256).digest()
    ).decode()
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/{ACCOUNT}/{container}?restype=container",
        method="PUT",
        headers={
            "x-ms-date": date,
            "x-ms-version": VERSION,
            "Authorization": f"SharedKey {ACCOUNT}:{sig}",
            "Content-Length": "0",
        },
    )
    try:
        with urllib.request.urlopen(req) as r:
            print(r.status)
    except urllib.error.HTTPError as e:
        sys.exit(f"creating container {container}: HTTP {e.code}: {e.read().decode()}")


main()
