"""fluxlora's nodes inside ComfyUI: a custom-node package that runs them on the daemon.

Place this folder in ComfyUI/custom_nodes/ (copy or symlink) and start
`fluxlora serve`; FLUXLORA_URL (default http://127.0.0.1:7860) and
FLUXLORA_TOKEN say where the daemon is. At import it reads the daemon's node
definitions and registers our `fluxlora` nodes; when the daemon cannot be
reached it registers nothing, and ComfyUI starts as usual.
"""

import logging
import os

from .daemon import Daemon, DaemonError
from .nodes import build_nodes

log = logging.getLogger(__name__)


def _web_directory():
    # The front-end extension: js/ inside this package, or the repository's
    # top-level js/ when this is bridge/comfyui of a checkout (symlinks resolved).
    here = os.path.dirname(os.path.realpath(__file__))
    for candidate in (os.path.join(here, "js"), os.path.join(here, "..", "..", "js")):
        if os.path.isdir(candidate):
            return os.path.abspath(candidate)
    return None


def _register():
    daemon = Daemon()
    try:
        definitions = daemon.object_info(timeout=5)
    except DaemonError as e:
        log.warning(
            "fluxlora: no nodes registered, the daemon did not answer (%s); "
            "start `fluxlora serve` (or set FLUXLORA_URL) and restart ComfyUI",
            e,
        )
        return {}, {}
    return build_nodes(daemon, definitions)


NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = _register()
WEB_DIRECTORY = _web_directory()

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
