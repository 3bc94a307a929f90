"""The bridge's WebSocket client, frame by frame, against hand-made server frames.

A daemon may never send some of these (fragmented messages, 64-bit lengths,
pings in the middle of a message), so they are checked here over a socket pair
with the RFC 6455 byte layout written out; no daemon, numpy or pillow needed.
"""

import importlib.util
import os
import socket
import struct
import sys
import unittest

PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_daemon_module():
    spec = importlib.util.spec_from_file_location(
        "fluxlora_ws_under_test", os.path.join(PACKAGE, "daemon.py")
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


daemon = load_daemon_module()


def frame(opcode, payload, fin=True):
    """A server frame: unmasked, with the shortest length encoding."""
    first = (0x80 if fin else 0) | opcode
    n = len(payload)
    if n < 126:
        header = struct.pack(">BB", first, n)
    elif n < 1 << 16:
        header = struct.pack(">BBH", first, 126, n)
    else:
        header = struct.pack(">BBQ", first, 127, n)
    return header + payload


def read_client_frame(sock):
    """(opcode, payload) of one client frame, checking that it is masked."""
    def exactly(n):
        data = b""
        while len(data) < n:
            chunk = sock.recv(n - len(data))
            if not chunk:
                raise EOFError
            data += chunk
        return data

    first, second = exactly(2)
    assert second & 0x80, "client frames must be masked"
    n = second & 0x7F
    if n == 126:
        (n,) = struct.unpack(">H", exactly(2))
    elif n == 127:
        (n,) = struct.unpack(">Q", exactly(8))
    mask = exactly(4)
    payload = bytes(b ^ mask[i % 4] for i, b in enumerate(exactly(n)))
    return first & 0x0F, payload


class WebSocketFramesTest(unittest.TestCase):
    def setUp(self):
        self.server, client = socket.socketpair()
        self.ws = daemon.WebSocket(client, b"")
        self.addCleanup(self.server.close)
        self.addCleanup(self.ws.close)

    def test_text_and_binary_of_every_length_encoding(self):
        big = bytes(range(256)) * 300  # 76800 bytes: a 64-bit length
        self.server.sendall(frame(0x1, b'{"type":"status"}') + frame(0x2, b"\x00" * 200) + frame(0x2, big))
        self.assertEqual(self.ws.receive(), '{"type":"status"}')
        self.assertEqual(self.ws.receive(), b"\x00" * 200)
        self.assertEqual(self.ws.receive(), big)

    def test_fragmented_message_with_a_ping_between_its_parts(self):
        self.server.sendall(
            frame(0x1, "héllo ".encode(), fin=False)
            + frame(0x9, b"are you there")
            + frame(0x0, b"wor", fin=False)
            + frame(0x0, b"ld")
        )
        self.assertEqual(self.ws.receive(), "héllo world")
        self.assertEqual(read_client_frame(self.server), (0xA, b"are you there"))

    def test_close_is_answered_and_ends_receiving(self):
        self.server.sendall(frame(0x8, struct.pack(">H", 1001)))
        with self.assertRaises(daemon.WebSocketClosed):
            self.ws.receive()
        self.assertEqual(read_client_frame(self.server), (0x8, struct.pack(">H", 1001)))

    def test_client_frames_are_masked(self):
        text = "x" * 300
        self.ws.send_text(text)
        self.assertEqual(read_client_frame(self.server), (0x1, text.encode()))

    def test_a_closed_connection_raises(self):
        self.server.close()
        with self.assertRaises(daemon.WebSocketClosed):
            self.ws.receive()


class ErrorTextTest(unittest.TestCase):
    def test_validation_errors_name_their_reasons(self):
        body = (
            b'{"error": {"type": "prompt_outputs_failed_validation", "message": "Prompt outputs failed validation",'
            b' "details": "", "extra_info": {}}, "node_errors": {"1": {"errors": [{"type": "value_bigger_than_max",'
            b' "message": "Value 5000 bigger than max of 4096", "details": "width", "extra_info": {}}]}}}'
        )
        self.assertEqual(
            daemon.error_text(body, 400),
            "Prompt outputs failed validation\nValue 5000 bigger than max of 4096: width",
        )

    def test_execution_errors_give_the_exception_message(self):
        body = b'{"error": {"type": "execution_error", "message": "dataset is empty", "details": "FluxLoraTrain"}}'
        self.assertEqual(daemon.error_text(body, 422), "dataset is empty")

    def test_a_body_that_is_not_json_is_shown_as_text(self):
        self.assertEqual(daemon.error_text(b"gateway down\n", 502), "gateway down")
        self.assertEqual(daemon.error_text(b"", 502), "HTTP 502")


if __name__ == "__main__":
    unittest.main()
