/**
 * The fluxlora front-end extension: on Train Flux LoRA nodes it shows, while
 * a run trains, step/total, loss, it/s and ETA, a live loss chart and the
 * newest sample image. It takes everything from ComfyUI's WebSocket events
 * (`progress`, `fluxlora.train`, `executing`, `execution_*`, previews), so the
 * daemon's served front end and a real ComfyUI behind the bridge show the same.
 *
 * This file owns the ComfyUI side (listeners, the node's panel, drawing);
 * what the state is and what it shows is train_progress.js's, which must stay
 * free of DOM and ComfyUI. Tests read `window.fluxlora.nodes` (read-only).
 */

import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import {
    TRAIN_CLASS,
    chartGeometry,
    createTracker,
    formatLoss,
    handleMessage,
    nodeView,
    previewTarget,
    setPreview,
} from "./train_progress.js";

const WIDGET = "fluxlora_progress";
const MESSAGES = [
    "execution_start",
    "execution_success",
    "execution_error",
    "execution_interrupted",
    "executing",
    "progress",
    "fluxlora.train",
];
const TEXT_HEIGHT = 34;
const CHART_HEIGHT = 112;
const IMAGE_HEIGHT = 180;
const PAD = { left: 6, right: 6, top: 16, bottom: 16 };

function graphNode(id) {
    // app.graph is the root graph, where the daemon's node ids live.
    const node = app.graph?.getNodeById?.(id);
    return node ?? null;
}

const tracker = createTracker({ isTrainNode: (id) => graphNode(id)?.comfyClass === TRAIN_CLASS });
window.fluxlora = { nodes: tracker.nodes };

/** Object URLs of our own preview copies, by node id (revoked when replaced). */
const ownUrls = new Map();
const pending = new Set();
let frame = null;

function changed(ids) {
    for (const id of ids) pending.add(id);
    if (ids.length === 0 || frame !== null) return;
    frame = requestAnimationFrame(() => {
        frame = null;
        const ids = [...pending];
        pending.clear();
        for (const id of ids) refresh(id);
        app.graph?.setDirtyCanvas?.(true, true);
    });
}

function dropOwnUrl(id) {
    const url = ownUrls.get(id);
    if (url === undefined || tracker.nodes[id]?.previewUrl === url) return;
    URL.revokeObjectURL(url);
    ownUrls.delete(id);
}

function refresh(id) {
    dropOwnUrl(id);
    const node = graphNode(id);
    if (node?.fluxloraPanel) renderPanel(node, node.fluxloraPanel);
}

/** The previews the front end itself shows on the node, if any. */
function frontEndPreviews(node) {
    const urls = app.nodePreviewImages?.[String(node.id)];
    return Array.isArray(urls) && urls.length > 0 ? urls : null;
}

/**
 * The front end shows a node's previews itself; it skips one that arrives
 * while the one before still loads. Then it is asked to show it again.
 */
function ensureNewestShows(node, urls) {
    if (!Array.isArray(node.imgs) || node.isLoading) return;
    if (node.imgs[0]?.src === urls[0]) return;
    node.preview = undefined;
}

function renderPanel(node, panel) {
    const state = tracker.nodes[String(node.id)];
    const view = nodeView(state);
    panel.root.dataset.phase = view.phase;
    panel.lines[0].textContent = view.lines[0];
    panel.lines[1].textContent = view.lines[1];
    drawChart(panel.canvas, state);
    const shown = frontEndPreviews(node);
    if (shown) ensureNewestShows(node, shown);
    // Our own copy only when the front end shows none (a preview without node metadata).
    const fallback = state?.previewUrl && !shown ? state.previewUrl : null;
    if (fallback) {
        if (panel.image.getAttribute("src") !== fallback) panel.image.src = fallback;
        panel.image.style.display = "block";
    } else {
        panel.image.style.display = "none";
        panel.image.removeAttribute("src");
    }
}

function cssColor(name, fallback) {
    const v = getComputedStyle(document.documentElement).getPropertyValue(name).trim();
    return v || fallback;
}

function strokeLine(ctx, points, color, width) {
    if (points.length < 2) return;
    ctx.beginPath();
    ctx.moveTo(points[0][0], points[0][1]);
    for (const [x, y] of points.slice(1)) ctx.lineTo(x, y);
    ctx.strokeStyle = color;
    ctx.lineWidth = width;
    ctx.stroke();
}

function drawChart(canvas, state) {
    const width = canvas.clientWidth || 280;
    const height = canvas.clientHeight || CHART_HEIGHT;
    const ratio = window.devicePixelRatio || 1;
    const w = Math.round(width * ratio);
    const h = Math.round(height * ratio);
    if (canvas.width !== w) canvas.width = w;
    if (canvas.height !== h) canvas.height = h;
    const ctx = canvas.getContext("2d");
    if (!ctx) return;
    ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
    ctx.clearRect(0, 0, width, height);
    const text = cssColor("--descrip-text", "#999");
    ctx.font = "10px sans-serif";
    ctx.fillStyle = text;
    const g = chartGeometry(state, { width, height, padding: PAD });
    if (g.loss.length < 2 && g.ema.length < 2) {
        ctx.textBaseline = "middle";
        ctx.fillText("loss chart: waiting for steps", PAD.left, height / 2);
        return;
    }
    ctx.strokeStyle = cssColor("--border-color", "#555");
    ctx.lineWidth = 1;
    ctx.strokeRect(g.box.left, g.box.top, g.box.right - g.box.left, g.box.bottom - g.box.top);
    strokeLine(ctx, g.loss, "rgba(96, 165, 250, 0.75)", 1);
    strokeLine(ctx, g.ema, "#f59e0b", 2);
    ctx.fillStyle = text;
    ctx.textBaseline = "bottom";
    ctx.fillText(`max ${formatLoss(g.max)}`, g.box.left, g.box.top - 2);
    ctx.textBaseline = "top";
    ctx.fillText(`min ${formatLoss(g.min)}`, g.box.left, g.box.bottom + 2);
    ctx.textAlign = "right";
    ctx.fillStyle = "#f59e0b";
    ctx.fillText("ema", g.box.right, g.box.bottom + 2);
    ctx.fillStyle = "rgba(96, 165, 250, 0.9)";
    ctx.fillText("loss", g.box.right - 26, g.box.bottom + 2);
    ctx.textAlign = "left";
    state.chartDrawn += 1;
}

function makePanel(node) {
    const root = document.createElement("div");
    root.className = "fluxlora-train-progress";
    Object.assign(root.style, {
        display: "flex",
        flexDirection: "column",
        gap: "2px",
        boxSizing: "border-box",
        padding: "2px 4px",
        font: "11px sans-serif",
        color: "var(--input-text, #ddd)",
        background: "var(--comfy-input-bg, #222)",
        borderRadius: "6px",
        overflow: "hidden",
    });
    const lines = [0, 1].map(() => {
        const line = document.createElement("div");
        Object.assign(line.style, { whiteSpace: "nowrap", overflow: "hidden", textOverflow: "ellipsis" });
        root.append(line);
        return line;
    });
    const canvas = document.createElement("canvas");
    Object.assign(canvas.style, { width: "100%", height: `${CHART_HEIGHT}px`, flex: "none" });
    const image = document.createElement("img");
    image.alt = "newest sample";
    Object.assign(image.style, { display: "none", width: "100%", height: `${IMAGE_HEIGHT}px`, objectFit: "contain" });
    root.append(canvas, image);
    const panel = { root, lines, canvas, image };
    new ResizeObserver(() => renderPanel(node, panel)).observe(canvas);
    return panel;
}

function addPanel(node) {
    const panel = makePanel(node);
    node.fluxloraPanel = panel;
    const widget = node.addDOMWidget(WIDGET, WIDGET, panel.root, {
        serialize: false,
        hideOnZoom: false,
        getMinHeight: () => TEXT_HEIGHT + CHART_HEIGHT + 12 + (panel.image.style.display === "none" ? 0 : IMAGE_HEIGHT),
    });
    // Neither in the workflow's widgets_values nor in the prompt.
    widget.serialize = false;
    const [w, h] = node.computeSize();
    node.setSize([Math.max(node.size[0], w, 300), Math.max(node.size[1], h)]);
    renderPanel(node, panel);
}

function forgetNode(node) {
    const id = String(node.id);
    if (tracker.nodes[id]) tracker.nodes[id].previewUrl = null;
    dropOwnUrl(id);
    delete tracker.nodes[id];
}

function onPreview(blob, meta) {
    const id = previewTarget(tracker, meta);
    if (id === null || !(blob instanceof Blob)) return;
    const url = URL.createObjectURL(blob);
    setPreview(tracker, id, url);
    dropOwnUrl(id);
    ownUrls.set(id, url);
    changed([id]);
}

let lastMetadataBlob = null;
for (const type of MESSAGES) {
    api.addEventListener(type, (e) => changed(handleMessage(tracker, type, e.detail)));
}
api.addEventListener("b_preview_with_metadata", (e) => {
    const d = e.detail ?? {};
    lastMetadataBlob = d.blob ?? null;
    onPreview(d.blob, { nodeId: d.displayNodeId ?? d.nodeId ?? null, promptId: d.jobId ?? null });
});
api.addEventListener("b_preview", (e) => {
    // The front end sends a preview with metadata as b_preview too: take it once.
    if (e.detail === lastMetadataBlob) return;
    onPreview(e.detail, {});
});

app.registerExtension({
    name: "fluxlora.train_progress",
    beforeRegisterNodeDef(nodeType, nodeData) {
        if (nodeData?.name !== TRAIN_CLASS) return;
        const created = nodeType.prototype.onNodeCreated;
        nodeType.prototype.onNodeCreated = function () {
            const r = created?.apply(this, arguments);
            addPanel(this);
            return r;
        };
        const removed = nodeType.prototype.onRemoved;
        nodeType.prototype.onRemoved = function () {
            forgetNode(this);
            return removed?.apply(this, arguments);
        };
    },
});
