"""Talking to the fluxlora daemon: its HTTP routes and its /ws WebSocket.

Owns the wire: JSON requests, the multipart image upload, the daemon's error
bodies (turned into DaemonError with the daemon's own message) and a small
RFC 6455 client. Knows nothing of ComfyUI, tensors or node classes.
Standard library only.
"""

import base64
import hashlib
import json
import os
import socket
import ssl
import struct
import threading
import urllib.error
import urllib.parse
import urllib.request
import uuid

DEFAULT_URL = "http://127.0.0.1:7860"


class DaemonError(RuntimeError):
    """The daemon answered with an error; the text is the daemon's message."""


class DaemonUnreachable(DaemonError):
    """Nothing answered at the daemon's address."""


def error_text(body, status):
    """The message of one of the daemon's error bodies (ComfyUI's shapes)."""
    try:
        answer = json.loads(body)
    except ValueError:
        answer = None
    if not isinstance(answer, dict):
        text = body.decode("utf-8", "replace").strip()
        return text or f"HTTP {status}"
    error = answer.get("error")
    if isinstance(error, str):
        return error
    if not isinstance(error, dict):
        return json.dumps(answer)
    lines = [str(error.get("message") or error.get("type") or f"HTTP {status}")]
    # A validation failure (400) names its reasons per node; show them all.
    for node in (answer.get("node_errors") or {}).values():
        for reason in node.get("errors", []) if isinstance(node, dict) else []:
            detail = reason.get("details")
            message = reason.get("message", "")
            lines.append(f"{message}: {detail}" if detail else message)
    return "\n".join(lines)


class Daemon:
    """One daemon, addressed by base URL (and an optional bearer token)."""

    def __init__(self, url=None, token=None):
        self.url = (url or os.environ.get("FLUXLORA_URL") or DEFAULT_URL).rstrip("/")
        self.token = token if token is not None else os.environ.get("FLUXLORA_TOKEN") or None

    def _request(self, method, path, body=None, content_type=None, timeout=None):
        headers = {}
        if content_type:
            headers["Content-Type"] = content_type
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        request = urllib.request.Request(
            self.url + path, data=body, method=method, headers=headers
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.read()
        except urllib.error.HTTPError as e:
            raise DaemonError(error_text(e.read(), e.code)) from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise DaemonUnreachable(f"fluxlora daemon at {self.url}: {reason}") from None

    def _json(self, method, path, value=None, timeout=None):
        body = None if value is None else json.dumps(value).encode("utf-8")
        content_type = None if value is None else "application/json"
        return self._decode(self._request(method, path, body, content_type, timeout), path)

    def _decode(self, answer, path):
        try:
            return json.loads(answer)
        except ValueError:
            raise DaemonError(f"{self.url}{path} did not answer JSON") from None

    def object_info(self, class_name=None, timeout=10):
        """The node definitions, or one class's definition ({class: NodeDef})."""
        path = "/object_info"
        if class_name is not None:
            path += "/" + urllib.parse.quote(class_name, safe="")
        return self._json("GET", path, timeout=timeout)

    def run(self, class_type, inputs, client_id):
        """Runs one node on the daemon and waits (no time limit: training takes long)."""
        body = {"class_type": class_type, "inputs": inputs, "client_id": client_id}
        return self._json("POST", "/fluxlora/run", body)

    def interrupt(self):
        self._request("POST", "/interrupt", b"", "application/json", timeout=10)

    def upload_image(self, png, filename, subfolder="fluxlora-bridge", kind="input"):
        """Uploads PNG bytes; answers the image reference {filename, subfolder, type}."""
        boundary = uuid.uuid4().hex
        parts = []
        for name, value in (("type", kind), ("subfolder", subfolder), ("overwrite", "true")):
            parts.append(
                f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'
                f"{value}\r\n".encode("utf-8")
            )
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; '
            f'filename="{filename}"\r\nContent-Type: image/png\r\n\r\n'.encode("utf-8")
            + png
            + b"\r\n"
        )
        parts.append(f"--{boundary}--\r\n".encode("utf-8"))
        answer = self._request(
            "POST",
            "/upload/image",
            b"".join(parts),
            f"multipart/form-data; boundary={boundary}",
            timeout=60,
        )
        answer = self._decode(answer, "/upload/image")
        return {
            "filename": answer["name"],
            "subfolder": answer.get("subfolder", ""),
            "type": answer.get("type", kind),
        }

    def view(self, reference):
        """The bytes of an image reference {filename, subfolder, type}."""
        query = urllib.parse.urlencode(
            {
                "filename": reference["filename"],
                "subfolder": reference.get("subfolder", ""),
                "type": reference.get("type", "output"),
            }
        )
        return self._request("GET", "/view?" + query, timeout=60)

    def websocket(self, client_id, timeout=10):
        """An open /ws connection for client_id."""
        query = {"clientId": client_id}
        if self.token:
            query["token"] = self.token
        return WebSocket.connect(self.url, "/ws?" + urllib.parse.urlencode(query), timeout)


class WebSocketClosed(Exception):
    """The connection ended (a close frame, or the socket went away)."""


_ACCEPT_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_CONTINUATION, _TEXT, _BINARY, _CLOSE, _PING, _PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA


class WebSocket:
    """A minimal RFC 6455 client: one reader thread, any thread may send or close."""

    def __init__(self, sock, buffered):
        self._sock = sock
        self._buffer = buffered
        self._send_lock = threading.Lock()
        self._closed = False

    @classmethod
    def connect(cls, base_url, path, timeout):
        url = urllib.parse.urlsplit(base_url)
        secure = url.scheme in ("https", "wss")
        port = url.port or (443 if secure else 80)
        sock = socket.create_connection((url.hostname, port), timeout=timeout)
        try:
            if secure:
                sock = ssl.create_default_context().wrap_socket(sock, server_hostname=url.hostname)
            key = base64.b64encode(os.urandom(16)).decode("ascii")
            prefix = url.path.rstrip("/")
            request = (
                f"GET {prefix}{path} HTTP/1.1\r\nHost: {url.netloc}\r\n"
                "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
            )
            sock.sendall(request.encode("ascii"))
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = sock.recv(4096)
                if not chunk:
                    raise WebSocketClosed("the daemon closed the connection during the handshake")
                head += chunk
            head, rest = head.split(b"\r\n\r\n", 1)
            lines = head.decode("latin-1").split("\r\n")
            if len(lines[0].split(" ")) < 2 or lines[0].split(" ")[1] != "101":
                raise WebSocketClosed(f"WebSocket handshake refused: {lines[0]}")
            headers = {}
            for line in lines[1:]:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            expected = base64.b64encode(
                hashlib.sha1(key.encode("ascii") + _ACCEPT_GUID).digest()
            ).decode("ascii")
            if headers.get("sec-websocket-accept") != expected:
                raise WebSocketClosed("WebSocket handshake: wrong Sec-WebSocket-Accept")
            return cls(sock, rest)
        except BaseException:
            sock.close()
            raise

    def settimeout(self, seconds):
        """How long receive may wait (None: until a message or close); connect set 'timeout'."""
        self._sock.settimeout(seconds)

    def _read_exactly(self, n):
        while len(self._buffer) < n:
            try:
                chunk = self._sock.recv(65536)
            except OSError as e:
                raise WebSocketClosed(str(e)) from None
            if not chunk:
                raise WebSocketClosed("connection closed")
            self._buffer += chunk
        data, self._buffer = self._buffer[:n], self._buffer[n:]
        return data

    def _read_frame(self):
        first, second = self._read_exactly(2)
        fin, opcode = bool(first & 0x80), first & 0x0F
        length = second & 0x7F
        if length == 126:
            (length,) = struct.unpack(">H", self._read_exactly(2))
        elif length == 127:
            (length,) = struct.unpack(">Q", self._read_exactly(8))
        mask = self._read_exactly(4) if second & 0x80 else None
        payload = self._read_exactly(length)
        if mask:
            payload = _masked(payload, mask)
        return fin, opcode, payload

    def receive(self):
        """The next message: (str or bytes). Answers pings; raises WebSocketClosed at the end."""
        kind, parts = None, []
        while True:
            fin, opcode, payload = self._read_frame()
            if opcode == _PING:
                self._send(_PONG, payload)
                continue
            if opcode == _PONG:
                continue
            if opcode == _CLOSE:
                self.close(payload[:2] or struct.pack(">H", 1000))
                raise WebSocketClosed("closed by the daemon")
            if opcode in (_TEXT, _BINARY):
                kind, parts = opcode, [payload]
            elif opcode == _CONTINUATION and kind is not None:
                parts.append(payload)
            else:
                raise WebSocketClosed(f"unexpected frame opcode {opcode}")
            if fin:
                message = b"".join(parts)
                return message.decode("utf-8") if kind == _TEXT else message

    def _send(self, opcode, payload):
        mask = os.urandom(4)
        length = len(payload)
        if length < 126:
            header = struct.pack(">BB", 0x80 | opcode, 0x80 | length)
        elif length < 1 << 16:
            header = struct.pack(">BBH", 0x80 | opcode, 0x80 | 126, length)
        else:
            header = struct.pack(">BBQ", 0x80 | opcode, 0x80 | 127, length)
        with self._send_lock:
            if self._closed:
                return
            try:
                self._sock.sendall(header + mask + _masked(payload, mask))
            except OSError:
                self._closed = True

    def send_text(self, text):
        self._send(_TEXT, text.encode("utf-8"))

    def close(self, code=struct.pack(">H", 1000)):
        """Sends a close frame (once) and ends the connection; wakes a blocked receive."""
        self._send(_CLOSE, code)
        with self._send_lock:
            self._closed = True
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()


def _masked(payload, mask):
    # XOR with the repeated 4-byte key, done on one big integer for speed.
    n = len(payload)
    if n == 0:
        return b""
    key = (mask * (n // 4 + 1))[:n]
    value = int.from_bytes(payload, "big") ^ int.from_bytes(key, "big")
    return value.to_bytes(n, "big")
