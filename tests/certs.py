"""Test certificates made with the openssl command: a CA, a server certificate for localhost /
127.0.0.1, a client certificate, an expired server certificate, one for another name, and a
second CA that signed none of them (the "wrong CA")."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Certs:
    dir: Path
    ca: Path  # the test CA's certificate
    server_cert: Path  # localhost, 127.0.0.1
    server_key: Path
    client_cert: Path  # CN=pgflow_cert (PostgreSQL cert auth: CN = the role)
    client_key: Path
    expired_cert: Path  # localhost, 127.0.0.1, valid in 2020 only
    expired_key: Path
    wrong_name_cert: Path  # other.example only
    wrong_name_key: Path
    other_ca: Path  # a CA that signed nothing here


def _ssl(*args: str, cwd: Path) -> None:
    proc = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args[:2])} failed: {proc.stderr.strip()[-400:]}")


def _ca(d: Path, name: str) -> None:
    _ssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        f"{name}.key",
        "-out",
        f"{name}.pem",
        "-days",
        "3",
        "-subj",
        f"/CN=pgflow test {name}",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
        cwd=d,
    )


def _leaf(d: Path, name: str, cn: str, san: str | None, client: bool = False, dates: tuple[str, str] | None = None) -> None:
    _ssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={cn}", cwd=d)
    ext = [
        "basicConstraints=CA:FALSE",
        f"extendedKeyUsage={'clientAuth' if client else 'serverAuth'}",
        "keyUsage=digitalSignature,keyEncipherment",
    ]
    if san:
        ext.append(f"subjectAltName={san}")
    (d / f"{name}.ext").write_text("\n".join(ext) + "\n")
    if dates is None:
        _ssl(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            f"{name}.pem",
            "-days",
            "3",
            "-extfile",
            f"{name}.ext",
            cwd=d,
        )
        return
    # openssl x509 cannot back-date; the ca command can (-startdate / -enddate).
    db = d / f"{name}-db"
    db.mkdir()
    (db / "index.txt").write_text("")
    (db / "serial").write_text("1000\n")
    (d / f"{name}-ca.cnf").write_text(
        "[ca]\ndefault_ca=test\n[test]\n"
        f"database={db}/index.txt\nserial={db}/serial\nnew_certs_dir={db}\n"
        "default_md=sha256\npolicy=any\ncopy_extensions=none\nunique_subject=no\n"
        "[any]\ncommonName=supplied\n"
    )
    _ssl(
        "ca",
        "-batch",
        "-config",
        f"{name}-ca.cnf",
        "-cert",
        "ca.pem",
        "-keyfile",
        "ca.key",
        "-in",
        f"{name}.csr",
        "-out",
        f"{name}.pem",
        "-startdate",
        dates[0],
        "-enddate",
        dates[1],
        "-extfile",
        f"{name}.ext",
        "-notext",
        cwd=d,
    )


def make_certs(d: Path) -> Certs:
    """Every certificate the network tests need, in ``d`` (readable by the server's user)."""
    d.mkdir(parents=True, exist_ok=True)
    _ca(d, "ca")
    _ca(d, "other-ca")
    _leaf(d, "server", "localhost", "DNS:localhost,IP:127.0.0.1")
    _leaf(d, "client", "pgflow_cert", None, client=True)
    _leaf(d, "expired", "localhost", "DNS:localhost,IP:127.0.0.1", dates=("20200101000000Z", "20200102000000Z"))
    _leaf(d, "wrong-name", "other.example", "DNS:other.example")
    for key in d.glob("*.key"):
        key.chmod(0o600)
    return Certs(
        d,
        d / "ca.pem",
        d / "server.pem",
        d / "server.key",
        d / "client.pem",
        d / "client.key",
        d / "expired.pem",
        d / "expired.key",
        d / "wrong-name.pem",
        d / "wrong-name.key",
        d / "other-ca.pem",
    )


def renewed_client(certs: Certs, name: str, cn: str) -> tuple[Path, Path]:
    """Another client certificate (and key) of the test CA, as a renewal would bring: (cert, key)."""
    if not (certs.dir / f"{name}.pem").exists():
        _leaf(certs.dir, name, cn, None, client=True)
    return certs.dir / f"{name}.pem", certs.dir / f"{name}.key"
