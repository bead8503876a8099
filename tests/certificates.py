"""Certificates made with openssl at test time: a CA, a server certificate
for the brokers' address, one for another host name, a client certificate, and a
second CA that signed none of them."""

import subprocess
from pathlib import Path

from broker import HOST


def openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_key(name, cwd):
    openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", f"{name}.key", cwd=cwd)


def make_ca(name, cwd):
    make_key(name, cwd)
    openssl("req", "-x509", "-new", "-key", f"{name}.key", "-days", "2", "-subj", f"/CN={name}", "-out", f"{name}.pem", cwd=cwd)


def make_signed(name, common_name, ca, cwd, extensions="basicConstraints=CA:FALSE\n"):
    make_key(name, cwd)
    openssl("req", "-new", "-key", f"{name}.key", "-subj", f"/CN={common_name}", "-out", f"{name}.csr", cwd=cwd)
    ext = Path(cwd) / f"{name}.ext"
    ext.write_text(extensions)
    openssl(
        "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key", "-CAcreateserial",
        "-days", "2", "-extfile", str(ext), "-out", f"{name}.pem", cwd=cwd,
    )


def to_der(name, cwd):
    """DER copies of a certificate and its key, as MicroPython's tls wants them."""
    openssl("x509", "-in", f"{name}.pem", "-outform", "DER", "-out", f"{name}.crt.der", cwd=cwd)
    openssl("ec", "-in", f"{name}.key", "-outform", "DER", "-out", f"{name}.key.der", cwd=cwd)


class Certificates:
    def __init__(self, directory):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        cwd = str(self.directory)
        make_ca("ca", cwd)
        make_ca("other-ca", cwd)
        # No subjectAltName: mbedtls 2.28 ignores IP address entries there,
        # and with the extension present it would not look at the CN.
        make_signed("server", HOST, "ca", cwd)
        make_signed("wrong-host", "wrong.example", "ca", cwd)
        make_signed("client", "firmware-client", "ca", cwd)
        for name in ("ca", "other-ca", "client"):
            to_der(name, cwd)

    def path(self, name):
        return str(self.directory / name)

    def listener(self, port, server="server", require_certificate=False):
        """mosquitto configuration lines for a TLS listener."""
        return (
            f"listener {port} {HOST}\n"
            f"cafile {self.path('ca.pem')}\n"
            f"certfile {self.path(server + '.pem')}\n"
            f"keyfile {self.path(server + '.key')}\n"
            f"require_certificate {'true' if require_certificate else 'false'}\n"
        )
