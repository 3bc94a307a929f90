/**
 * Live progress of Train Flux LoRA nodes, as pure logic: the state of each
 * node built from ComfyUI's WebSocket events (`progress`, our `fluxlora.train`,
 * `executing`, `execution_*`, previews), the text the node shows, and the
 * geometry of its loss chart.
 *
 * This module owns no DOM, no canvas and no ComfyUI import, so it runs under
 * node's test runner as it does in the browser; fluxlora.js feeds it events
 * and draws what it answers.
 *
 * Which messages count: a prompt is ours once `execution_start` names it (it
 * ends with `execution_success`, `_error` or `_interrupted`); messages of other
 * prompts are ignored. Through the bridge a real ComfyUI relays our
 * `fluxlora.train` with the daemon's prompt id, so a message for the node that
 * ComfyUI says is executing also counts for the running prompt. When no prompt
 * is known (the page opened while one ran) the first message adopts its prompt.
 * A node's earlier run is cleared by the first message of a new prompt for that
 * node, so a Train node that a later prompt takes from the cache keeps its chart.
 */

/** ComfyUI class name of the Train Flux LoRA node. */
export const TRAIN_CLASS = "FluxLoraTrain";

const END_PHASES = {
    execution_success: "done",
    execution_error: "error",
    execution_interrupted: "interrupted",
};
/** How many ended prompt ids are remembered (never adopted again). */
const ENDED_KEPT = 64;

/**
 * A tracker of every Train node's progress.
 * @param {{isTrainNode?: (id: string) => boolean}} options
 *   isTrainNode says whether a graph node id is a Train Flux LoRA node;
 *   messages for any other node are ignored.
 */
export function createTracker({ isTrainNode = () => true } = {}) {
    return {
        /** Node id -> state; the object itself never changes (window.fluxlora.nodes). */
        nodes: {},
        /** Prompts started and not ended, oldest first. */
        active: [],
        ended: [],
        /** The node ComfyUI says is executing, or null. */
        executing: null,
        isTrainNode,
    };
}

function emptyRun(state, promptId) {
    Object.assign(state, {
        promptId,
        phase: "idle",
        step: null,
        total: null,
        loss: null,
        loss_ema: null,
        lr: null,
        it_per_s: null,
        eta_s: null,
        progress: null,
        steps: [],
        losses: [],
        emas: [],
        previewUrl: null,
        previews: 0,
    });
    return state;
}

/** The state of a node no message has reached yet. */
export function nodeState(id) {
    // chartDrawn counts draws over the node's whole life (the browser test reads it).
    return emptyRun({ id, chartDrawn: 0 }, null);
}

function nodeKey(id) {
    if (typeof id === "number" && Number.isFinite(id)) return String(id);
    if (typeof id === "string" && id !== "") return id;
    return null;
}

function promptKey(id) {
    return typeof id === "string" && id !== "" ? id : null;
}

function finite(v) {
    return typeof v === "number" && Number.isFinite(v) ? v : null;
}

/**
 * The state a message about `nodeId` in `promptId` updates, or null when the
 * message is not ours (another node, another prompt).
 */
function claim(tracker, nodeId, promptId) {
    const id = nodeKey(nodeId);
    if (id === null || !tracker.isTrainNode(id)) return null;
    const prompt = promptKey(promptId);
    const state = tracker.nodes[id];
    let run = null;
    if (prompt !== null && tracker.active.includes(prompt)) {
        run = prompt;
    } else if (tracker.active.length > 0 && id === tracker.executing) {
        // A relayed message (the bridge) carries the daemon's prompt id.
        run = state && tracker.active.includes(state.promptId) ? state.promptId : tracker.active.at(-1);
    } else if (tracker.active.length === 0 && prompt !== null && !tracker.ended.includes(prompt)) {
        tracker.active.push(prompt);
        run = prompt;
    } else {
        return null;
    }
    const s = state ?? (tracker.nodes[id] = nodeState(id));
    if (s.promptId !== run) emptyRun(s, run);
    return s;
}

function endPrompt(tracker, type, detail) {
    const prompt = promptKey(detail?.prompt_id);
    if (prompt === null) return [];
    tracker.active = tracker.active.filter((p) => p !== prompt);
    if (!tracker.ended.includes(prompt)) {
        tracker.ended.push(prompt);
        if (tracker.ended.length > ENDED_KEPT) tracker.ended.shift();
    }
    if (tracker.active.length === 0) tracker.executing = null;
    const failedNode = nodeKey(detail?.node_id);
    const changed = [];
    for (const state of Object.values(tracker.nodes)) {
        if (state.promptId !== prompt) continue;
        if (state.phase === "preparing" || state.phase === "training") {
            state.phase = END_PHASES[type];
            changed.push(state.id);
        } else if (type === "execution_error" && state.id === failedNode) {
            state.phase = "error";
            changed.push(state.id);
        }
    }
    return changed;
}

function executing(tracker, detail) {
    // The front end hands the node id; older ones hand {node, prompt_id}.
    const isObject = detail !== null && typeof detail === "object";
    const node = nodeKey(isObject ? (detail.display_node ?? detail.node) : detail);
    tracker.executing = node;
    if (node === null) return [];
    const state = claim(tracker, node, isObject ? detail.prompt_id : null);
    if (state === null) return [];
    if (state.phase === "idle") state.phase = "preparing";
    return [state.id];
}

function progress(tracker, detail) {
    const state = claim(tracker, detail?.node, detail?.prompt_id);
    if (state === null) return [];
    const value = finite(detail.value);
    const max = finite(detail.max);
    if (value !== null && max !== null) state.progress = { value, max };
    if (state.phase === "idle") state.phase = "preparing";
    return [state.id];
}

function trainStep(tracker, detail) {
    const state = claim(tracker, detail?.node, detail?.prompt_id);
    if (state === null) return [];
    const step = finite(detail.step);
    if (step !== null) {
        // A step again or an earlier one (a restarted run): drop what it replaces.
        while (state.steps.length > 0 && state.steps.at(-1) >= step) {
            state.steps.pop();
            state.losses.pop();
            state.emas.pop();
        }
        state.steps.push(step);
        state.losses.push(finite(detail.loss));
        state.emas.push(finite(detail.loss_ema));
        state.step = step;
    }
    state.total = finite(detail.total) ?? state.total;
    state.loss = finite(detail.loss);
    state.loss_ema = finite(detail.loss_ema);
    state.lr = finite(detail.lr);
    state.it_per_s = finite(detail.it_per_s);
    state.eta_s = finite(detail.eta_s);
    state.phase = "training";
    return [state.id];
}

/**
 * Applies one WebSocket event (its type and the CustomEvent's detail).
 * @returns {string[]} the ids of the nodes whose state changed
 */
export function handleMessage(tracker, type, detail) {
    switch (type) {
        case "execution_start": {
            const prompt = promptKey(detail?.prompt_id);
            if (prompt !== null && !tracker.active.includes(prompt)) tracker.active.push(prompt);
            return [];
        }
        case "execution_success":
        case "execution_error":
        case "execution_interrupted":
            return endPrompt(tracker, type, detail);
        case "executing":
            return executing(tracker, detail);
        case "progress":
            return progress(tracker, detail);
        case "fluxlora.train":
            return trainStep(tracker, detail);
        default:
            return [];
    }
}

/**
 * The node a preview image belongs to, or null when it is not one of ours.
 * meta: {nodeId, promptId} from `b_preview_with_metadata`; without a node id
 * (a plain `b_preview`) it is the executing node's.
 */
export function previewTarget(tracker, { nodeId = null, promptId = null } = {}) {
    const node = nodeKey(nodeId) ?? tracker.executing;
    if (node === null) return null;
    const state = claim(tracker, node, promptId);
    return state === null ? null : state.id;
}

/** Records the newest preview image (its URL) of a node. */
export function setPreview(tracker, id, url) {
    const state = tracker.nodes[id];
    if (!state) return;
    state.previewUrl = url;
    state.previews += 1;
}

/** Seconds as h:mm:ss, or m:ss under an hour; "--:--" when unknown. */
export function formatDuration(seconds) {
    const s = finite(seconds);
    if (s === null || s < 0) return "--:--";
    const total = Math.round(s);
    const h = Math.floor(total / 3600);
    const m = Math.floor((total % 3600) / 60);
    const sec = String(total % 60).padStart(2, "0");
    return h > 0 ? `${h}:${String(m).padStart(2, "0")}:${sec}` : `${m}:${sec}`;
}

/** Steps per second with three significant digits: "3.21 it/s". */
export function formatRate(itPerS) {
    const r = finite(itPerS);
    if (r === null || r < 0) return "-- it/s";
    const digits = r >= 100 ? 0 : r >= 10 ? 1 : 2;
    return `${r.toFixed(digits)} it/s`;
}

/** A loss with 4 significant digits: "0.1234", "1.235e-5"; "--" when unknown. */
export function formatLoss(loss) {
    const v = finite(loss);
    return v === null ? "--" : v.toPrecision(4);
}

/** A learning rate: "2.00e-4". */
export function formatLr(lr) {
    const v = finite(lr);
    return v === null ? "--" : v.toExponential(2);
}

/** "step 12/300" ("step 12" while the total is unknown). */
export function formatStep(step, total) {
    const s = finite(step) ?? 0;
    const t = finite(total);
    return t === null ? `step ${s}` : `step ${s}/${t}`;
}

/**
 * What the node shows as text: a status word and two lines.
 * @returns {{phase: string, lines: [string, string]}}
 */
export function nodeView(state) {
    const phase = state?.phase ?? "idle";
    if (!state || phase === "idle") {
        return { phase: "idle", lines: ["Not trained yet", "progress shows here while it trains"] };
    }
    if (phase === "preparing" && state.step === null) {
        const p = state.progress;
        return {
            phase,
            lines: [p ? `preparing ${p.value}/${p.max}` : "preparing", "waiting for the first step"],
        };
    }
    const first = `${formatStep(state.step, state.total)} · loss ${formatLoss(state.loss)}`;
    const ema = `ema ${formatLoss(state.loss_ema)}`;
    switch (phase) {
        case "training":
        case "preparing":
            return {
                phase,
                lines: [
                    first,
                    `${formatRate(state.it_per_s)} · ETA ${formatDuration(state.eta_s)} · ${ema} · lr ${formatLr(state.lr)}`,
                ],
            };
        case "done":
            return { phase, lines: [first, `done · ${formatRate(state.it_per_s)} · ${ema}`] };
        case "error":
            return { phase, lines: [first, `failed at ${formatStep(state.step, state.total)}`] };
        default:
            return { phase, lines: [first, `interrupted at ${formatStep(state.step, state.total)}`] };
    }
}

/**
 * At most `max` items of `items`, evenly spaced, always with the first and the
 * last (max is taken as at least 2).
 */
export function downsample(items, max) {
    const n = items.length;
    const limit = Math.max(2, Math.floor(max));
    if (n <= limit) return items.slice();
    const out = [];
    for (let k = 0; k < limit; k++) out.push(items[Math.round((k * (n - 1)) / (limit - 1))]);
    return out;
}

function paddingOf(padding) {
    if (typeof padding === "number") return { left: padding, right: padding, top: padding, bottom: padding };
    return { left: 0, right: 0, top: 0, bottom: 0, ...padding };
}

/**
 * The loss chart of a node state in a width x height box (canvas coordinates:
 * y grows down). x runs from the first step at the left to the total (or the
 * last step) at the right; y from the largest loss or EMA at the top to the
 * smallest at the bottom. Long runs are downsampled to at most maxPoints
 * (default: one per pixel of the plot's width).
 * @returns {{box: {left, top, right, bottom}, min: ?number, max: ?number,
 *   loss: [number, number][], ema: [number, number][]}}
 */
export function chartGeometry(state, { width, height, padding = 6, maxPoints } = {}) {
    const pad = paddingOf(padding);
    const box = { left: pad.left, top: pad.top, right: width - pad.right, bottom: height - pad.bottom };
    const steps = state?.steps ?? [];
    const losses = state?.losses ?? [];
    const emas = state?.emas ?? [];
    let min = Infinity;
    let max = -Infinity;
    const drawn = [];
    for (let i = 0; i < steps.length; i++) {
        const vs = [losses[i], emas[i]].filter((v) => finite(v) !== null);
        if (vs.length === 0) continue;
        drawn.push(i);
        min = Math.min(min, ...vs);
        max = Math.max(max, ...vs);
    }
    if (drawn.length === 0) return { box, min: null, max: null, loss: [], ema: [] };
    const plotWidth = Math.max(0, box.right - box.left);
    const plotHeight = Math.max(0, box.bottom - box.top);
    const picked = downsample(drawn, maxPoints ?? Math.max(2, plotWidth));
    const x0 = steps[drawn[0]];
    const x1 = Math.max(steps[drawn.at(-1)], finite(state.total) ?? -Infinity);
    const xSpan = x1 > x0 ? x1 - x0 : 1;
    let lo = min;
    let hi = max;
    if (hi === lo) {
        const half = Math.abs(lo) * 0.05 || 0.5;
        lo -= half;
        hi += half;
    }
    const x = (s) => box.left + ((s - x0) / xSpan) * plotWidth;
    const y = (v) => box.top + ((hi - v) / (hi - lo)) * plotHeight;
    const line = (values) =>
        picked.filter((i) => finite(values[i]) !== null).map((i) => [x(steps[i]), y(values[i])]);
    return { box, min, max, loss: line(losses), ema: line(emas) };
}
