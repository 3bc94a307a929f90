"""ComfyUI node classes built from the daemon's node definitions.

Owns the translation between a definition (ComfyUI's /object_info shape) and a
classic ComfyUI node class, and between a node's Python inputs/outputs and the
JSON of POST /fluxlora/run. The work itself happens on the daemon.
"""

import hashlib
import logging
import time

from . import images, progress
from .daemon import DaemonError

log = logging.getLogger(__name__)

# Only our own nodes: ComfyUI has its own Save/Preview/Load Image.
CATEGORY = "fluxlora"
# How a node learns its id in the ComfyUI graph (a hidden input ComfyUI fills).
_NODE_ID = "unique_id"
_REFRESH_S = 2.0


def ours(definition):
    category = definition.get("category", "")
    return category == CATEGORY or category.startswith(CATEGORY + "/")


def build_nodes(daemon, definitions):
    """(NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS) for our classes in definitions."""
    classes, names = {}, {}
    for class_name, definition in definitions.items():
        if not ours(definition):
            continue
        classes[class_name] = node_class(daemon, class_name, definition)
        names[class_name] = definition.get("display_name") or class_name
    return classes, names


def input_types(definition):
    """ComfyUI's INPUT_TYPES dict: sections in the definition's input order."""
    given = definition.get("input", {})
    order = definition.get("input_order", {})
    sections = {}
    for section in ("required", "optional"):
        specs = given.get(section) or {}
        names = order.get(section) or list(specs)
        names += [name for name in specs if name not in names]
        sections[section] = {name: tuple(specs[name]) for name in names if name in specs}
    sections["hidden"] = {_NODE_ID: "UNIQUE_ID"}
    return sections


def always_reruns(definition):
    """Whether the node's result depends on more than its inputs: it reads a running
    job (the live adapter), so ComfyUI must not reuse an earlier result."""
    fields = (definition.get("fluxlora") or {}).get("fields") or {}
    return "live_job" in fields.values()


def node_class(daemon, class_name, definition):
    """One ComfyUI node class that runs class_name on the daemon."""
    known = {"definition": definition, "at": time.monotonic()}
    outputs = list(definition.get("output", []))
    output_is_list = list(definition.get("output_is_list") or [False] * len(outputs))

    def current():
        # COMBO lists (e.g. the LoRA folder) change while ComfyUI runs: ask again
        # (ComfyUI asks many times per prompt, so at most every few seconds),
        # and keep the last answer when the daemon is away.
        if time.monotonic() - known["at"] < _REFRESH_S:
            return known["definition"]
        known["at"] = time.monotonic()
        try:
            fresh = daemon.object_info(class_name, timeout=2).get(class_name)
        except DaemonError as e:
            if not known.get("stale"):
                log.warning("fluxlora: %s keeps its last known inputs (%s)", class_name, e)
            known["stale"] = True
            return known["definition"]
        known["stale"] = False
        if fresh:
            known["definition"] = fresh
        return known["definition"]

    def INPUT_TYPES(cls):
        return input_types(current())

    def run(self, **inputs):
        node_id = inputs.pop(_NODE_ID, None)
        definition = known["definition"]
        sent = {name: _to_daemon(daemon, _type_of(definition, name), value, name)
                for name, value in inputs.items()}
        answer = progress.run(daemon, class_name, sent, node_id=str(node_id) if node_id is not None else None)
        values = answer.get("outputs", [])
        if len(values) != len(outputs):
            raise RuntimeError(
                f"fluxlora: {class_name} answered {len(values)} outputs, expected {len(outputs)}"
            )
        return tuple(
            _from_daemon(daemon, kind, value, is_list)
            for kind, value, is_list in zip(outputs, values, output_is_list)
        )

    attributes = {
        "INPUT_TYPES": classmethod(INPUT_TYPES),
        "RETURN_TYPES": tuple(outputs),
        "RETURN_NAMES": tuple(definition.get("output_name") or outputs),
        "OUTPUT_IS_LIST": tuple(output_is_list),
        "OUTPUT_TOOLTIPS": tuple(definition.get("output_tooltips") or ()),
        "FUNCTION": "run",
        "CATEGORY": definition.get("category", CATEGORY),
        "OUTPUT_NODE": bool(definition.get("output_node")),
        "DESCRIPTION": definition.get("description", ""),
        "run": run,
    }
    if always_reruns(definition):
        attributes["IS_CHANGED"] = classmethod(lambda cls, **inputs: float("nan"))
    return type(class_name, (), attributes)


def _type_of(definition, name):
    for section in ("required", "optional"):
        spec = (definition.get("input", {}).get(section) or {}).get(name)
        if spec:
            return spec[0]
    return None


def _to_daemon(daemon, kind, value, name):
    """The JSON the daemon takes for one input value."""
    if kind != "IMAGE":
        return value  # widgets are plain; links carry the daemon's own JSON back
    # Named by content: the daemon caches by its inputs, so a new image must get a
    # new reference, and the same image the same one.
    return [
        daemon.upload_image(png, f"{name}-{hashlib.sha256(png).hexdigest()[:20]}.png")
        for png in images.tensor_to_pngs(value)
    ]


def _from_daemon(daemon, kind, value, is_list):
    """The Python value ComfyUI passes on for one output of the daemon."""
    if kind != "IMAGE":
        return value
    if is_list:
        return [images.pngs_to_tensor([daemon.view(reference)]) for reference in value]
    return images.pngs_to_tensor([daemon.view(reference) for reference in value])
