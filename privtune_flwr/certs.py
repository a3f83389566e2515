"""Certificates and keys for a Flower deployment on one host (TLS and SuperNode authentication).

``python -m privtune_flwr.certs DIR [--nodes 2] [--host 127.0.0.1]`` writes into ``DIR``:

* ``ca.crt`` / ``ca.key``: a self-signed certificate authority, valid for 30 days;
* ``server.crt`` / ``server.key``: the SuperLink's certificate, signed by the CA, for ``--host``,
  ``127.0.0.1``, ``::1`` and ``localhost``;
* ``supernode-<i>.key`` / ``supernode-<i>.pub``: one ECDSA P-384 key pair per SuperNode in
  OpenSSH format, the format ``flwr supernode register`` and ``flower-supernode
  --auth-supernode-private-key`` read.

They are for trying a deployment out on loopback; a real federation uses certificates from its
own authority. Existing files are kept (``--force`` replaces them).
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

VALID_DAYS = 30


def _write(path: Path, data: bytes, private: bool = False) -> None:
    path.write_bytes(data)
    if private:
        path.chmod(0o600)


def _pem_key(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _subject_alt_names(host: str) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = [x509.DNSName("localhost")]
    for ip in {"127.0.0.1", "::1", host}:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(ip)))
        except ValueError:  # a host name, not an address
            names.append(x509.DNSName(ip))
    return x509.SubjectAlternativeName(names)


def make_tls(folder: Path, host: str = "127.0.0.1") -> dict[str, Path]:
    """CA and SuperLink certificate; returns the paths by role (ca, certfile, keyfile)."""
    now = dt.datetime.now(dt.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "privtune-flwr loopback CA")])
    ca = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP384R1())
    cert = (
        x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]))
        .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=VALID_DAYS))
        .add_extension(_subject_alt_names(host), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    paths = {"ca": folder / "ca.crt", "certfile": folder / "server.crt", "keyfile": folder / "server.key"}
    _write(paths["ca"], ca.public_bytes(serialization.Encoding.PEM))
    _write(folder / "ca.key", _pem_key(ca_key), private=True)
    _write(paths["certfile"], cert.public_bytes(serialization.Encoding.PEM))
    _write(paths["keyfile"], _pem_key(key), private=True)
    return paths


def make_supernode_keys(folder: Path, name: str) -> tuple[Path, Path]:
    """An ECDSA P-384 key pair in OpenSSH format: (private key path, public key path)."""
    key = ec.generate_private_key(ec.SECP384R1())
    private, public = folder / f"{name}.key", folder / f"{name}.pub"
    _write(private, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                      serialization.NoEncryption()), private=True)
    _write(public, key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + b"\n")
    return private, public


def make_all(folder: Path, nodes: int, host: str = "127.0.0.1", force: bool = False) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    if force or not (folder / "ca.crt").exists():
        make_tls(folder, host)
    for i in range(nodes):
        if force or not (folder / f"supernode-{i}.key").exists():
            make_supernode_keys(folder, f"supernode-{i}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--nodes", type=int, default=2, help="SuperNode key pairs to write; default 2")
    parser.add_argument("--host", default="127.0.0.1", help="address the SuperLink's certificate is for; default 127.0.0.1")
    parser.add_argument("--force", action="store_true", help="replace existing files")
    args = parser.parse_args(argv)
    if not 0 <= args.nodes <= 1000:
        parser.error(f"--nodes={args.nodes} is outside the accepted range 0..1000")
    make_all(args.folder, args.nodes, args.host, args.force)
    print(f"certificates and SuperNode keys in {args.folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
