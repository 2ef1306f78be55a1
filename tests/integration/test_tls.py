"""amqps:// works, and verifies the broker's certificate by default.

RabbitMQ here listens without TLS, so the test puts a real TLS terminator in front of
it: a TLS server socket with a fresh self-signed certificate, piping bytes to the broker.
"""
import select
import socket
import ssl
import subprocess
import threading

import pytest

from amqprpc import RpcClient, ServiceUnavailable
from amqprpc.testing import running_worker

from rabbit_node import broker_address

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    return cert, key


@pytest.fixture(scope="module")
def tls_port(certificate, broker_url):
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(*map(str, certificate))
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    stop = threading.Event()

    def pipe(client_sock):
        try:
            tls = context.wrap_socket(client_sock, server_side=True)
        except (ssl.SSLError, OSError):
            client_sock.close()
            return
        upstream = socket.create_connection(broker_address(broker_url))
        try:
            while not stop.is_set():
                readable, _, _ = select.select([tls, upstream], [], [], 0.2)
                if tls.pending():
                    readable.append(tls)
                for source in set(readable):
                    data = source.recv(65536)
                    if not data:
                        return
                    (upstream if source is tls else tls).sendall(data)
        except (ssl.SSLError, OSError):
            pass
        finally:
            tls.close()
            upstream.close()

    def accept():
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                sock, _ = listener.accept()
            except socket.timeout:
                continue
            threading.Thread(target=pipe, args=(sock,), daemon=True).start()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield port
    stop.set()
    thread.join(2)
    listener.close()


def test_calls_work_over_amqps_with_a_verified_certificate(service, certificate, tls_port, monkeypatch):
    monkeypatch.setenv("AMQPRPC_SSL_CA_FILE", str(certificate[0]))
    url = f"amqps://guest:guest@localhost:{tls_port}//"
    service.handler("echo")(lambda payload: payload)
    with running_worker(service, broker_url=url), RpcClient("tls", broker_url=url) as client:
        assert client.call(service.name, "echo", {"over": "tls"}) == {"over": "tls"}


def test_an_untrusted_certificate_is_refused(tls_port, monkeypatch):
    monkeypatch.delenv("AMQPRPC_SSL_CA_FILE", raising=False)
    with pytest.raises(ServiceUnavailable, match="(?i)certificate"):
        RpcClient("tls", broker_url=f"amqps://guest:guest@localhost:{tls_port}//", connect_timeout=3)
