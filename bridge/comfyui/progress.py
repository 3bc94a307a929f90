"""One node run on the daemon, with its progress relayed into ComfyUI.

Owns the life of a run: a /ws connection under a fresh client id, opened before
the run is posted so no message is missed; a reader thread that queues what the
socket says; the request itself on a second thread; and the ComfyUI side
(progress bar, previews, `fluxlora.train` messages, interrupts), driven from the
calling thread so ComfyUI sees the updates in its executing context. ComfyUI's
modules are imported here, lazily, and may be absent (outside ComfyUI).
"""

import json
import logging
import queue
import struct
import threading
import time
import uuid

from . import images
from .daemon import DaemonError, WebSocketClosed

log = logging.getLogger(__name__)

# After the daemon answers, messages of the run may still be on their way.
_DRAIN_S = 3.0
_END_TYPES = ("execution_success", "execution_error", "execution_interrupted")
_PREVIEW_IMAGE = 1
_FORMATS = {1: "JPEG", 2: "PNG"}
_logged = set()


def _log_once(key, message, *args):
    if key not in _logged:
        _logged.add(key)
        log.warning(message, *args)


class ComfyUI:
    """The parts of a running ComfyUI the relay uses; each may be missing."""

    def __init__(self):
        try:
            from comfy.utils import ProgressBar

            self.progress_bar = ProgressBar
        except ImportError:
            self.progress_bar = None
            _log_once("utils", "fluxlora: comfy.utils not found; progress is not shown")
        try:
            from server import PromptServer

            self.server = PromptServer.instance
        except (ImportError, AttributeError):
            self.server = None
            _log_once("server", "fluxlora: ComfyUI's server not found; training messages are not relayed")
        try:
            import comfy.model_management as model_management

            self.interrupted = model_management.processing_interrupted
            self.raise_if_interrupted = model_management.throw_exception_if_processing_interrupted
        except (ImportError, AttributeError):
            self.interrupted = lambda: False
            self.raise_if_interrupted = lambda: None

    def send(self, event, data):
        if self.server is not None:
            self.server.send_sync(event, data)


class Display:
    """What the relay shows for one run: a progress bar and its previews."""

    def __init__(self, comfy, node_id):
        self.comfy = comfy
        self.node_id = node_id
        self.bar = None
        self.value = 0
        self.total = 0
        self.preview = None  # a preview that came before the first progress

    def text(self, message):
        """Shows one text message; answers the prompt id it ends, if it ends one."""
        try:
            message = json.loads(message)
            kind, data = message.get("type"), message.get("data") or {}
        except (ValueError, AttributeError):
            return None
        if kind == "progress":
            self.value, self.total = int(data.get("value", 0)), int(data.get("max", 0))
            self._show(self.preview)
            self.preview = None
        elif kind == "fluxlora.train":
            if self.node_id is not None:
                # ComfyUI's front end knows its own node ids, not the daemon's.
                data = dict(data, node=self.node_id)
            self.comfy.send("fluxlora.train", data)
        elif kind == "executing" and data.get("node") is None:
            return data.get("prompt_id")
        elif kind in _END_TYPES:
            return data.get("prompt_id")
        return None

    def binary(self, frame):
        if len(frame) < 8:
            return
        event, fmt = struct.unpack(">II", frame[:8])
        if event != _PREVIEW_IMAGE or fmt not in _FORMATS:
            return
        try:
            preview = (_FORMATS[fmt], images.decode(frame[8:]), None)
        except OSError:
            return
        if self.bar is None:
            self.preview = preview
        else:
            self._show(preview)

    def _show(self, preview):
        if self.comfy.progress_bar is None or self.total <= 0:
            return
        if self.bar is None:
            self.bar = self.comfy.progress_bar(self.total, node_id=self.node_id)
        self.bar.update_absolute(self.value, self.total, preview)


def run(daemon, class_type, inputs, node_id=None):
    """Runs one node on the daemon; answers its {prompt_id, outputs} answer."""
    comfy = ComfyUI()
    display = Display(comfy, node_id)
    client_id = str(uuid.uuid4())
    events = queue.Queue()
    ws = _open_socket(daemon, client_id, events)

    def request():
        try:
            events.put(("answer", daemon.run(class_type, inputs, client_id)))
        except BaseException as e:  # handed to the calling thread
            events.put(("failed", e))

    threading.Thread(target=request, name="fluxlora-run", daemon=True).start()
    ended, outcome, deadline, interrupted = set(), None, None, False
    try:
        while True:
            if outcome is None and not interrupted and comfy.interrupted():
                interrupted = True  # the user stopped the prompt: stop the daemon's job
                _interrupt(daemon)
            wait = 0.25 if deadline is None else deadline - time.monotonic()
            try:
                kind, value = events.get(timeout=max(wait, 0))
            except queue.Empty:
                if deadline is not None:
                    break  # answered; the end message did not come in time
                continue
            if kind == "text":
                ended.add(display.text(value))
            elif kind == "binary":
                display.binary(value)
            elif kind == "closed":
                ws = None
                if outcome is not None:
                    break
            else:
                outcome = (kind, value)
                if kind == "failed" or ws is None:
                    break
                deadline = time.monotonic() + _DRAIN_S
            if outcome and outcome[0] == "answer" and outcome[1].get("prompt_id") in ended:
                break
    except BaseException:
        # ComfyUI interrupts by raising from its progress hook: stop the daemon's job too.
        if outcome is None and not interrupted:
            _interrupt(daemon)
        raise
    finally:
        if ws is not None:
            ws.close()
    if interrupted:
        comfy.raise_if_interrupted()
    kind, value = outcome
    if kind == "failed":
        raise value
    return value


def _open_socket(daemon, client_id, events):
    """Connects /ws and starts its reader; None (progress not shown) when it fails."""
    ws = None
    try:
        ws = daemon.websocket(client_id)
        # The first message (`status`) says the daemon has registered the socket.
        events.put(("text", ws.receive()))
        ws.settimeout(None)
    except (DaemonError, WebSocketClosed, OSError) as e:
        if ws is not None:
            ws.close()
        _log_once("ws", "fluxlora: no progress from the daemon's /ws (%s)", e)
        return None

    def read():
        try:
            while True:
                message = ws.receive()
                events.put(("text" if isinstance(message, str) else "binary", message))
        except (WebSocketClosed, OSError):
            events.put(("closed", None))

    threading.Thread(target=read, name="fluxlora-ws", daemon=True).start()
    return ws


def _interrupt(daemon):
    try:
        daemon.interrupt()
    except DaemonError as e:
        log.warning("fluxlora: could not interrupt the daemon: %s", e)
