"""The ComfyUI bridge against a real daemon, as ComfyUI would load and run it.

Starts `fluxlora serve` (FLUXLORA_BIN, or target/debug/fluxlora of this checkout)
on a free port with a fresh data dir and the built-in tiny model, puts stand-ins
for the ComfyUI modules the package imports into sys.modules, loads the package
the way ComfyUI loads a custom node (its folder as a package), and runs nodes
through the classes it registers. Needs numpy and pillow (scripts/bridge-test.sh
makes a venv with them).
"""

import importlib.util
import json
import math
import os
import socket
import subprocess
import sys
import tempfile
import time
import types
import unittest
import urllib.request

import numpy as np

PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPO = os.path.dirname(os.path.dirname(PACKAGE))


# --- Stand-ins for what ComfyUI provides ------------------------------------

class Tensor:
    """torch.Tensor as far as the bridge uses it, over a numpy array.

    Real torch is too large to install for CI; the bridge only needs from_numpy
    and the usual detach().cpu().numpy() way back.
    """

    def __init__(self, array):
        self.array = array

    @property
    def shape(self):
        return tuple(self.array.shape)

    @property
    def dtype(self):
        return self.array.dtype

    def detach(self):
        return self

    def cpu(self):
        return self

    def numpy(self):
        return self.array


class ProgressBar:
    """comfy.utils.ProgressBar, recording every update."""

    made = []
    on_update = None  # a test's hook: called with each update

    def __init__(self, total, node_id=None):
        self.total = total
        self.node_id = node_id
        self.updates = []
        ProgressBar.made.append(self)

    def update_absolute(self, value, total=None, preview=None):
        if total is not None:
            self.total = total
        self.updates.append((value, self.total, preview))
        if ProgressBar.on_update is not None:
            ProgressBar.on_update(value, self.total, preview)


class PromptServer:
    """server.PromptServer.instance, recording what nodes send to the front end."""

    def __init__(self):
        self.sent = []

    def send_sync(self, event, data, sid=None):
        self.sent.append((event, data))


class InterruptProcessingException(Exception):
    pass


class Interrupt:
    """comfy.model_management's interrupt flag (ComfyUI's Cancel button sets it)."""

    def __init__(self):
        self.flag = False

    def requested(self):
        return self.flag

    def throw(self):
        if self.flag:
            self.flag = False
            raise InterruptProcessingException()


def install_stand_ins():
    torch = types.ModuleType("torch")
    torch.from_numpy = Tensor
    comfy = types.ModuleType("comfy")
    comfy.__path__ = []
    utils = types.ModuleType("comfy.utils")
    utils.ProgressBar = ProgressBar
    model_management = types.ModuleType("comfy.model_management")
    model_management.InterruptProcessingException = InterruptProcessingException
    model_management.interrupt = Interrupt()
    model_management.processing_interrupted = model_management.interrupt.requested
    model_management.throw_exception_if_processing_interrupted = model_management.interrupt.throw
    comfy.utils, comfy.model_management = utils, model_management
    server = types.ModuleType("server")
    server.PromptServer = types.SimpleNamespace(instance=PromptServer())
    sys.modules.update(
        {
            "torch": torch,
            "comfy": comfy,
            "comfy.utils": utils,
            "comfy.model_management": model_management,
            "server": server,
        }
    )
    return server.PromptServer.instance, model_management.interrupt


def load_package(name="fluxlora"):
    """The package, imported as ComfyUI imports a custom-node folder."""
    spec = importlib.util.spec_from_file_location(
        name, os.path.join(PACKAGE, "__init__.py"), submodule_search_locations=[PACKAGE]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


# --- The daemon -------------------------------------------------------------

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url):
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.loads(r.read())


class DaemonProcess:
    def __init__(self, data_dir):
        binary = os.environ.get("FLUXLORA_BIN") or os.path.join(REPO, "target", "debug", "fluxlora")
        if not os.path.exists(binary):
            raise RuntimeError(f"no daemon binary at {binary} (cargo build --bin fluxlora, or set FLUXLORA_BIN)")
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = os.path.join(data_dir, "daemon.log")
        self.log = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            [binary, "serve", "--port", str(port), "--data-dir", os.path.join(data_dir, "data")],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 120
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"the daemon exited ({self.process.returncode}):\n{self.tail()}")
            try:
                get_json(self.url + "/system_stats")
                return
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"the daemon did not answer:\n{self.tail()}")
                time.sleep(0.2)

    def tail(self):
        self.log.flush()
        with open(self.log_path, "rb") as f:
            return f.read()[-4000:].decode("utf-8", "replace")

    def stop(self):
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()


def setUpModule():
    global TMP, DAEMON, SERVER, INTERRUPT, BRIDGE
    TMP = tempfile.TemporaryDirectory(prefix="fluxlora-bridge-")
    DAEMON = DaemonProcess(TMP.name)
    os.environ["FLUXLORA_URL"] = DAEMON.url
    os.environ.pop("FLUXLORA_TOKEN", None)
    SERVER, INTERRUPT = install_stand_ins()
    BRIDGE = load_package()


def tearDownModule():
    DAEMON.stop()
    TMP.cleanup()


# --- Helpers over the registered classes ------------------------------------

def node(display_name):
    """An instance of the registered class shown as display_name."""
    for class_name, shown in BRIDGE.NODE_DISPLAY_NAME_MAPPINGS.items():
        if shown == display_name:
            return BRIDGE.NODE_CLASS_MAPPINGS[class_name]()
    raise AssertionError(f"no node {display_name!r} in {BRIDGE.NODE_DISPLAY_NAME_MAPPINGS}")


def widget_defaults(instance):
    """The required widget values as a new node would have them."""
    values = {}
    for name, spec in type(instance).INPUT_TYPES()["required"].items():
        kind, options = spec[0], (spec[1] if len(spec) > 1 else {})
        if isinstance(kind, list):
            values[name] = options.get("default", kind[0] if kind else "")
        elif kind in ("INT", "FLOAT", "STRING", "BOOLEAN"):
            values[name] = options.get("default", {"INT": 0, "FLOAT": 0.0, "STRING": "", "BOOLEAN": False}[kind])
    return values


def call(instance, links=None, node_id=None, **widgets):
    """Runs a node as ComfyUI's executor does: widget values and linked outputs as keywords."""
    inputs = type(instance).INPUT_TYPES()
    known = set(inputs["required"]) | set(inputs.get("optional", {}))
    values = widget_defaults(instance)
    for name in list(widgets) + list(links or {}):
        assert name in known, f"{type(instance).__name__} has no input {name!r}: {sorted(known)}"
    values.update(widgets)
    values.update(links or {})
    if node_id is not None:
        values["unique_id"] = node_id
    return getattr(instance, type(instance).FUNCTION)(**values)


def output(instance, result, name):
    return result[type(instance).RETURN_NAMES.index(name)]


def two_image_dataset():
    """A Flux LoRA Dataset of two drawn images, passed in from the graph (uploaded)."""
    pixels = np.zeros((2, 64, 64, 3), np.float32)
    pixels[0, 16:48, 16:48, 0] = 1.0
    pixels[1, 8:56, 24:40, 2] = 1.0
    (dataset,) = call(
        node("Flux LoRA Dataset"),
        links={"images": Tensor(pixels)},
        source="images",
        caption_template="a photo of [trigger]",
        trigger_word="sks",
        resolution=64,
        enable_bucket=False,
    )
    return dataset


# --- Tests ------------------------------------------------------------------

class BridgeTest(unittest.TestCase):
    def test_registers_the_daemons_nodes_and_samples(self):
        info = get_json(DAEMON.url + "/object_info")
        ours = {k: v for k, v in info.items() if v["category"] == "fluxlora" or v["category"].startswith("fluxlora/")}
        self.assertTrue(ours)
        self.assertEqual(set(BRIDGE.NODE_CLASS_MAPPINGS), set(ours))
        self.assertNotIn("SaveImage", BRIDGE.NODE_CLASS_MAPPINGS)
        for class_name, definition in ours.items():
            cls = BRIDGE.NODE_CLASS_MAPPINGS[class_name]
            self.assertEqual(cls.RETURN_TYPES, tuple(definition["output"]), class_name)
            self.assertEqual(cls.RETURN_NAMES, tuple(definition["output_name"]), class_name)
            self.assertEqual(cls.FUNCTION, "run")
            self.assertEqual(cls.CATEGORY, definition["category"])
            self.assertEqual(cls.OUTPUT_NODE, definition["output_node"])
            self.assertEqual(BRIDGE.NODE_DISPLAY_NAME_MAPPINGS[class_name], definition["display_name"])
            # Widgets appear in the definition's order, as ComfyUI lays them out.
            inputs = cls.INPUT_TYPES()
            self.assertEqual(list(inputs["required"]), definition["input_order"]["required"])
        # The live adapter reads a running job: ComfyUI must run it every time.
        live = type(node("Flux LoRA Live Adapter"))
        self.assertTrue(math.isnan(live.IS_CHANGED(job_id="x", strength=1.0)))
        self.assertFalse(hasattr(type(node("Apply LoRA")), "IS_CHANGED"))
        js = os.path.join(REPO, "js")
        self.assertEqual(BRIDGE.WEB_DIRECTORY, os.path.abspath(js) if os.path.isdir(js) else None)

        sample = node("Flux Sample")
        before = len(ProgressBar.made)
        (images,) = call(sample, prompt="a red circle", width=64, height=32, steps=2, batch_size=2, seed=3)
        self.assertIsInstance(images, Tensor)
        self.assertEqual(images.shape, (2, 32, 64, 3))
        self.assertEqual(images.dtype, np.float32)
        self.assertTrue(0.0 <= images.array.min() and images.array.max() <= 1.0)
        self.assertGreater(images.array.std(), 0.0)
        bars = ProgressBar.made[before:]
        self.assertTrue(bars, "sampling showed no progress")
        self.assertEqual([u[0] for u in bars[-1].updates][-1], 2)

        # The daemon's refusal reaches ComfyUI as a RuntimeError with the daemon's words.
        with self.assertRaises(RuntimeError) as refused:
            call(sample, prompt="x", width=5000, height=64, steps=1)
        self.assertIn("5000", str(refused.exception))

    def test_without_a_daemon_nothing_is_registered_and_the_import_succeeds(self):
        os.environ["FLUXLORA_URL"] = f"http://127.0.0.1:{free_port()}"
        self.addCleanup(os.environ.__setitem__, "FLUXLORA_URL", DAEMON.url)
        with self.assertLogs(level="WARNING") as logged:
            alone = load_package("fluxlora_without_daemon")
        self.assertEqual((alone.NODE_CLASS_MAPPINGS, alone.NODE_DISPLAY_NAME_MAPPINGS), ({}, {}))
        self.assertEqual(len(logged.records), 1, logged.output)
        self.assertIn("fluxlora serve", logged.output[0])

    def test_train_then_apply_then_sample(self):
        steps = 4
        train = node("Train Flux LoRA")
        before = len(ProgressBar.made)
        sent_before = len(SERVER.sent)
        trained = call(
            train,
            links={"dataset": two_image_dataset()},
            node_id="7",
            output_name="bridge",
            max_train_steps=steps,
            network_dim=2,
            network_alpha=2.0,
            learning_rate=0.01,
        )
        bars = ProgressBar.made[before:]
        self.assertTrue(bars, "training showed no progress")
        # The daemon shows caching the images first (max = the image count), then
        # the optimizer steps (max = the total steps).
        updates = bars[0].updates
        self.assertEqual(updates[-1][:2], (steps, steps), updates)
        values = [value for value, total, _ in updates if total == steps]
        self.assertEqual(values, sorted(values), updates)
        self.assertGreaterEqual(len(values), steps, updates)
        self.assertEqual(bars[0].node_id, "7")
        relayed = [data for event, data in SERVER.sent[sent_before:] if event == "fluxlora.train"]
        self.assertEqual([d["step"] for d in relayed], list(range(1, steps + 1)))
        self.assertTrue(all(d["node"] == "7" and d["total"] == steps for d in relayed), relayed)
        self.assertTrue(all(math.isfinite(d["loss"]) for d in relayed), relayed)

        (stack,) = call(node("Apply LoRA"), links={"lora": output(train, trained, "lora")}, strength=1.0)
        sample = node("Flux Sample")
        with_lora = dict(prompt="a photo of sks", width=64, height=64, steps=2, seed=5)
        (images,) = call(sample, links={"loras": stack}, **with_lora)
        self.assertEqual(images.shape, (1, 64, 64, 3))
        (base,) = call(sample, **with_lora)
        self.assertGreater(np.abs(images.array - base.array).max(), 0.0, "the LoRA changed nothing")

        # Apply LoRA's file list shows the new LoRA without a restart (ComfyUI asks
        # INPUT_TYPES again; the bridge asks the daemon at most every 2 s).
        time.sleep(2.1)
        files = type(node("Apply LoRA")).INPUT_TYPES()["optional"]["lora_name"][0]
        self.assertIn("bridge.safetensors", files)

        (graph,) = call(node("Flux LoRA Loss Graph"), job_id=output(train, trained, "job_id"), width=256, height=128)
        self.assertEqual(graph.shape, (1, 128, 256, 3))

        # The daemon ran the jobs.
        jobs = {job["id"]: job for job in get_json(DAEMON.url + "/v1/jobs")}
        job = jobs[output(train, trained, "job_id")]
        self.assertEqual((job["kind"], job["state"]), ("train", "finished"), job)
        samples = [j for j in jobs.values() if j["kind"] == "sample" and j["created"] > job["updated"]]
        self.assertEqual(len(samples), 2, jobs)
        self.assertTrue(all(j["state"] == "finished" for j in samples), samples)

    def test_stopping_the_prompt_stops_the_training_job(self):
        train = node("Train Flux LoRA")

        def stop_at_step_2(value, total, preview):
            if total == 1000 and value >= 2:
                INTERRUPT.flag = True

        ProgressBar.on_update = stop_at_step_2
        self.addCleanup(setattr, ProgressBar, "on_update", None)
        started = time.time()
        with self.assertRaises(InterruptProcessingException):
            call(
                train,
                links={"dataset": two_image_dataset()},
                output_name="stopped",
                max_train_steps=1000,
                network_dim=2,
                network_alpha=2.0,
            )
        self.assertFalse(INTERRUPT.flag)
        jobs = [j for j in get_json(DAEMON.url + "/v1/jobs?kind=train") if j["created"] >= started - 1]
        self.assertEqual(len(jobs), 1, jobs)
        self.assertNotEqual(jobs[0]["state"], "finished", jobs)
        self.assertNotEqual(jobs[0]["state"], "running", jobs)


if __name__ == "__main__":
    unittest.main()
