"""An HTTPS front for a local berth: what a cloud endpoint looks like to the gateway's remote.

    tls_proxy.py CERT KEY LISTEN_PORT UPSTREAM_PORT

Serves HTTPS on 127.0.0.1:LISTEN_PORT with CERT/KEY and passes each request to
http://127.0.0.1:UPSTREAM_PORT, recording the Authorization header it saw in a file beside CERT
(`CERT.auth`), so a test can check which key arrived. Prints "ready" once listening.
"""
import http.client
import http.server
import ssl
import sys

cert, key, listen, upstream = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])


class Proxy(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        with open(cert + ".auth", "a") as f:
            f.write(self.headers.get("Authorization", "") + "\n")
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
        c = http.client.HTTPConnection("127.0.0.1", upstream, timeout=120)
        c.request("POST", self.path, body, headers)
        r = c.getresponse()
        data = r.read()
        self.send_response(r.status)
        for k, v in r.getheaders():
            if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


server = http.server.ThreadingHTTPServer(("127.0.0.1", listen), Proxy)
context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
context.load_cert_chain(cert, key)
server.socket = context.wrap_socket(server.socket, server_side=True)
print("ready", flush=True)
server.serve_forever()
