"""Throw-away certificates for the DICOM TLS tests, made with the ``openssl`` command line.

``make_pki(folder)`` writes a test CA and, signed by it, the certificates the tests need
(RSA 2048, because DCMTK's default BCP 195 profile offers RSA cipher suites only), plus
one from a second CA nobody trusts and one that expired. Every certificate is issued with
``openssl ca`` and explicit validity dates, so the expired one really lies in the past
(``notBefore`` 2020-01-01, ``notAfter`` 2021-01-01) rather than being backdated by a
negative day count. Subjects carry ``O=Test Hospital`` and a common name; the node and
the PACS get ``subjectAltName`` 127.0.0.1 and localhost, so host name checks pass on the
loopback address the tests use.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

_ORG = "Test Hospital"
_VALID = ("20200101000000Z", "20991231235959Z")
_EXPIRED = ("20200101000000Z", "20210101000000Z")

_CA_CONFIG = """\
[ca]
default_ca = test_ca
[test_ca]
dir = {dir}
database = $dir/index.txt
new_certs_dir = $dir/issued
serial = $dir/serial
default_md = sha256
policy = policy_any
unique_subject = no
copy_extensions = none
[policy_any]
commonName = supplied
organizationName = optional
organizationalUnitName = optional
[ca_ext]
basicConstraints = critical, CA:true
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
[node_ext]
basicConstraints = critical, CA:false
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth, clientAuth
subjectAltName = IP:127.0.0.1, DNS:localhost
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
"""


@dataclass(frozen=True)
class Pair:
    """A certificate and its private key (PEM files)."""

    cert: Path
    key: Path


@dataclass(frozen=True)
class Pki:
    """The files ``make_pki`` wrote: ``ca`` is the trusted CA's certificate."""

    ca: Path
    node: Pair  # the node's own certificate (CN=dicom-node), server and client use
    pacs: Pair  # the PACS's (Orthanc, storescp) certificate (CN=pacs)
    ct1: Pair  # a modality's client certificate (CN=CT1)
    ct2: Pair  # another modality's client certificate (CN=CT2)
    expired: Pair  # CN=CT1 again, valid 2020-01-01 .. 2021-01-01
    untrusted: Pair  # CN=CT1 too, issued by a CA that is not in any trust store
    untrusted_ca: Path


def _openssl(*args: str | Path, cwd: Path) -> None:
    proc = subprocess.run(
        ["openssl", *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=60
    )
    if proc.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(map(str, args))} failed:\n{proc.stderr}")


class _Ca:
    """A minimal ``openssl ca`` set-up in ``folder`` (self-signed root)."""

    def __init__(self, folder: Path, name: str) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "issued").mkdir(exist_ok=True)
        (folder / "index.txt").write_text("")
        (folder / "serial").write_text("1000\n")
        self.config = folder / "ca.cnf"
        self.config.write_text(_CA_CONFIG.format(dir=folder))
        self.cert = folder / "ca.pem"
        key = folder / "ca.key"
        _openssl("genrsa", "-out", key, "2048", cwd=folder)
        _openssl("req", "-new", "-key", key, "-out", folder / "ca.csr",
                 "-subj", f"/O={_ORG}/CN={name}", cwd=folder)  # fmt: skip
        _openssl("ca", "-batch", "-config", self.config, "-selfsign", "-keyfile", key,
                 "-in", folder / "ca.csr", "-out", self.cert, "-extensions", "ca_ext",
                 "-startdate", _VALID[0], "-enddate", _VALID[1], "-notext", cwd=folder)  # fmt: skip
        self.key = key

    def issue(self, out: Path, common_name: str, dates: tuple[str, str] = _VALID) -> Pair:
        key, csr, cert = out / f"{out.name}.key", out / f"{out.name}.csr", out / f"{out.name}.pem"
        out.mkdir(parents=True, exist_ok=True)
        _openssl("genrsa", "-out", key, "2048", cwd=out)
        _openssl("req", "-new", "-key", key, "-out", csr,
                 "-subj", f"/O={_ORG}/CN={common_name}", cwd=out)  # fmt: skip
        _openssl("ca", "-batch", "-config", self.config, "-cert", self.cert,
                 "-keyfile", self.key, "-in", csr, "-out", cert, "-extensions", "node_ext",
                 "-startdate", dates[0], "-enddate", dates[1], "-notext", cwd=out)  # fmt: skip
        return Pair(cert, key)


def make_pki(folder: Path) -> Pki:
    """Write the test CA and every certificate of ``Pki`` under ``folder`` (~1 s)."""
    ca = _Ca(folder / "ca", "Test Hospital DICOM CA")
    other = _Ca(folder / "other-ca", "Somebody Else's CA")
    return Pki(
        ca=ca.cert,
        node=ca.issue(folder / "node", "dicom-node"),
        pacs=ca.issue(folder / "pacs", "pacs"),
        ct1=ca.issue(folder / "ct1", "CT1"),
        ct2=ca.issue(folder / "ct2", "CT2"),
        expired=ca.issue(folder / "expired", "CT1", _EXPIRED),
        untrusted=other.issue(folder / "untrusted", "CT1"),
        untrusted_ca=other.cert,
    )
