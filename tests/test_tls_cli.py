"""TLS from the command line and the workflow file, against a real TLS dask cluster.

Certificates come from the ``openssl`` CLI in a temporary directory: a CA, a
certificate for the scheduler/workers and one for the client; a second CA
signs the "wrong" client certificate.
"""
import shutil

import pytest
from dask_processes import dask_cluster
from test_cli import QUICK, WORKFLOWS, _env, dmlcore
from tls_certs import make_ca as _ca
from tls_certs import make_cert as _cert

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    d = tmp_path_factory.mktemp("certs")
    _ca(d, "ca")
    _ca(d, "other-ca")
    return {"node": _cert(d, "ca", "node"), "client": _cert(d, "ca", "client"),
            "wrong": _cert(d, "other-ca", "wrong")}


@pytest.fixture(scope="module")
def tls_scheduler(tmp_path_factory, certs):
    from distributed import Security

    node = certs["node"]
    flags = ["--tls-ca-file", node["ca_file"], "--tls-cert", node["cert"], "--tls-key",
             node["key"]]
    c = certs["client"]
    sec = Security(tls_ca_file=c["ca_file"], tls_client_cert=c["cert"],
                   tls_client_key=c["key"], require_encryption=True)
    with dask_cluster(tmp_path_factory.mktemp("tls-logs"), [([], None)] * 2, env=_env(),
                      scheduler_args=["--protocol", "tls", *flags], worker_args=flags,
                      security=sec) as address:
        assert address.startswith("tls://")
        yield address


def _flags(c):
    return ["--tls-ca-file", c["ca_file"], "--tls-cert", c["cert"], "--tls-key", c["key"]]


@pytest.mark.slow
def test_info_and_run_over_tls(tls_scheduler, certs, tmp_path):
    proc = dmlcore("info", "--scheduler", tls_scheduler, *_flags(certs["client"]), timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "2 workers" in proc.stdout
    # flags
    proc = dmlcore("run", WORKFLOWS / "quickstart.yaml", *QUICK, "--no-progress",
                   "--scheduler", tls_scheduler, *_flags(certs["client"]),
                   "--set", f"output.dir={tmp_path / 'a'}")
    assert proc.returncode == 0, proc.stderr
    # the YAML section
    c = certs["client"]
    wf = tmp_path / "tls.yaml"
    text = (WORKFLOWS / "quickstart.yaml").read_text().replace(
        "  local: {n_workers: 2, threads_per_worker: 1}",
        f"  address: {tls_scheduler}\n  tls: {{ca_file: {c['ca_file']}, cert: {c['cert']}, "
        f"key: {c['key']}}}")
    wf.write_text(text)
    sets = [a for a in QUICK if a != "cluster.local.n_workers=1"][:-1]
    proc = dmlcore("run", wf, *sets, "--no-progress", "--set", f"output.dir={tmp_path / 'b'}")
    assert proc.returncode == 0, proc.stderr


@pytest.mark.slow
def test_wrong_or_missing_certificates_are_one_line(tls_scheduler, certs, tmp_path):
    for args in (_flags(certs["wrong"]), []):
        for cmd in (["info", "--scheduler", tls_scheduler],
                    ["run", WORKFLOWS / "quickstart.yaml", *QUICK, "--scheduler", tls_scheduler,
                     "--set", f"output.dir={tmp_path / 'x'}"]):
            proc = dmlcore(*cmd, *args, timeout=60)
            lines = proc.stderr.strip().splitlines()
            assert proc.returncode == 2, proc.stderr
            assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
            assert ("--tls-cert" if not args else "cannot reach") in lines[0], lines[0]
    assert not (tmp_path / "x").exists()


def test_validate_names_the_missing_certificate_file(tmp_path):
    wf = tmp_path / "w.yaml"
    wf.write_text((WORKFLOWS / "quickstart.yaml").read_text().replace(
        "  local: {n_workers: 2, threads_per_worker: 1}",
        "  address: tls://127.0.0.1:8786\n"
        "  tls: {ca_file: nope-ca.pem, cert: c.pem, key: k.pem}"))
    proc = dmlcore("validate", wf)
    assert proc.returncode == 2
    line = proc.stderr.strip()
    lineno = 1 + next(i for i, t in enumerate(wf.read_text().splitlines()) if "  tls:" in t)
    assert f"w.yaml:{lineno}:" in line and "cluster.tls.ca_file" in line, line
    assert "nope-ca.pem" in line
