"""Test certificates from the ``openssl`` command: a CA, certificates it signs
(for 127.0.0.1 / localhost), and a TLS ``LocalCluster`` that uses them."""
import contextlib
import subprocess
from pathlib import Path


def _ssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_ca(d, name):
    _ssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN={name}",
         "-keyout", f"{name}.key", "-out", f"{name}.pem", cwd=d)


def make_cert(d, ca, name):
    """A certificate signed by ``ca``: {"ca_file", "cert", "key"} paths."""
    ext = Path(d) / f"{name}.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    _ssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout",
         f"{name}.key", "-out", f"{name}.csr", cwd=d)
    _ssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
         "-CAcreateserial", "-days", "2", "-extfile", ext.name, "-out", f"{name}.pem", cwd=d)
    return {"ca_file": str(Path(d) / f"{ca}.pem"), "cert": str(Path(d) / f"{name}.pem"),
            "key": str(Path(d) / f"{name}.key")}


def cluster_security(d):
    """A ``distributed.Security`` for scheduler, workers and client, one CA, TLS required."""
    from distributed import Security

    make_ca(d, "ca")
    node, client = make_cert(d, "ca", "node"), make_cert(d, "ca", "client")
    return Security(tls_ca_file=node["ca_file"], tls_scheduler_cert=node["cert"],
                    tls_scheduler_key=node["key"], tls_worker_cert=node["cert"],
                    tls_worker_key=node["key"], tls_client_cert=client["cert"],
                    tls_client_key=client["key"], require_encryption=True)


@contextlib.contextmanager
def tls_local_cluster(d, n_workers=2, **kwargs):
    """A process-based ``LocalCluster`` on ``tls://127.0.0.1`` and its client."""
    from distributed import Client, LocalCluster

    security = cluster_security(d)
    cluster = LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True,
                           protocol="tls", host="127.0.0.1", dashboard_address=None,
                           security=security, **kwargs)
    client = Client(cluster, security=security)
    try:
        yield client
    finally:
        client.close()
        cluster.close()
