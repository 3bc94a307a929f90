// Unit tests of js/train_progress.js (node --test js/tests/).
import { test } from "node:test";
import assert from "node:assert/strict";

import {
    chartGeometry,
    createTracker,
    downsample,
    formatDuration,
    formatLoss,
    formatRate,
    formatStep,
    handleMessage,
    nodeView,
    previewTarget,
    setPreview,
} from "../train_progress.js";

const TRAIN = new Set(["3", "7"]);
const tracker = () => createTracker({ isTrainNode: (id) => TRAIN.has(id) });

function step(node, prompt, n, loss, extra = {}) {
    return {
        prompt_id: prompt,
        node,
        step: n,
        total: 4,
        loss,
        loss_ema: loss === null ? null : Math.round((loss + 0.01) * 100) / 100,
        lr: 0.002,
        it_per_s: 2.5,
        eta_s: (4 - n) / 2.5,
        ...extra,
    };
}

/** A copy of a node's state without the fields that are not data. */
function snapshot(t, id) {
    return JSON.parse(JSON.stringify(t.nodes[id] ?? null));
}

test("a run's messages give the node's state", () => {
    const t = tracker();
    assert.deepEqual(handleMessage(t, "execution_start", { prompt_id: "p1" }), []);
    assert.deepEqual(handleMessage(t, "executing", "3"), ["3"]);
    assert.equal(t.nodes["3"].phase, "preparing");
    handleMessage(t, "progress", { value: 2, max: 5, prompt_id: "p1", node: "3" });
    assert.deepEqual(t.nodes["3"].progress, { value: 2, max: 5 });
    assert.deepEqual(nodeView(t.nodes["3"]).lines[0], "preparing 2/5");
    for (const [n, loss] of [[1, 0.5], [2, 0.4], [3, 0.3]]) {
        assert.deepEqual(handleMessage(t, "fluxlora.train", step("3", "p1", n, loss)), ["3"]);
    }
    const s = t.nodes["3"];
    assert.equal(s.phase, "training");
    assert.equal(s.step, 3);
    assert.equal(s.total, 4);
    assert.equal(s.loss, 0.3);
    assert.equal(s.loss_ema, 0.31);
    assert.equal(s.lr, 0.002);
    assert.equal(s.it_per_s, 2.5);
    assert.equal(s.eta_s, 0.4);
    assert.deepEqual(s.steps, [1, 2, 3]);
    assert.deepEqual(s.losses, [0.5, 0.4, 0.3]);
    assert.deepEqual(s.emas, [0.51, 0.41, 0.31]);
    assert.deepEqual(nodeView(s), {
        phase: "training",
        lines: ["step 3/4 · loss 0.3000", "2.50 it/s · ETA 0:00 · ema 0.3100 · lr 2.00e-3"],
    });
    assert.deepEqual(handleMessage(t, "execution_success", { prompt_id: "p1" }), ["3"]);
    assert.equal(s.phase, "done");
    assert.equal(nodeView(s).lines[1], "done · 2.50 it/s · ema 0.3100");
    assert.deepEqual(t.active, []);
});

test("a step again or an earlier one replaces what came after it", () => {
    const t = tracker();
    handleMessage(t, "execution_start", { prompt_id: "p1" });
    for (const n of [1, 2, 3]) handleMessage(t, "fluxlora.train", step("3", "p1", n, 1 / n));
    handleMessage(t, "fluxlora.train", step("3", "p1", 2, 0.9));
    assert.deepEqual(t.nodes["3"].steps, [1, 2]);
    assert.deepEqual(t.nodes["3"].losses, [1, 0.9]);
});

test("a new prompt clears the node's run when its first message comes, not before", () => {
    const t = tracker();
    handleMessage(t, "execution_start", { prompt_id: "p1" });
    handleMessage(t, "fluxlora.train", step("3", "p1", 1, 0.5));
    handleMessage(t, "execution_success", { prompt_id: "p1" });
    handleMessage(t, "execution_start", { prompt_id: "p2" });
    // The node was taken from the cache: nothing about it in p2 yet.
    assert.deepEqual(t.nodes["3"].losses, [0.5]);
    assert.equal(t.nodes["3"].phase, "done");
    handleMessage(t, "progress", { value: 0, max: 4, prompt_id: "p2", node: "3" });
    assert.deepEqual(t.nodes["3"].losses, []);
    assert.equal(t.nodes["3"].step, null);
    assert.equal(t.nodes["3"].promptId, "p2");
    assert.equal(t.nodes["3"].phase, "preparing");
});

test("messages for other nodes and other prompts do not change a node's state", () => {
    const t = tracker();
    handleMessage(t, "execution_start", { prompt_id: "p1" });
    handleMessage(t, "fluxlora.train", step("3", "p1", 1, 0.5));
    const before = snapshot(t, "3");
    // Another Train node, a node that is not a Train node, another prompt.
    assert.deepEqual(handleMessage(t, "fluxlora.train", step("7", "p1", 1, 9)), ["7"]);
    assert.deepEqual(handleMessage(t, "fluxlora.train", step("5", "p1", 2, 9)), []);
    assert.deepEqual(handleMessage(t, "progress", { value: 1, max: 2, prompt_id: "p1", node: "5" }), []);
    assert.deepEqual(handleMessage(t, "fluxlora.train", step("3", "other", 2, 9)), []);
    assert.deepEqual(handleMessage(t, "progress", { value: 3, max: 4, prompt_id: "other", node: "3" }), []);
    assert.deepEqual(handleMessage(t, "execution_success", { prompt_id: "other" }), []);
    assert.equal(previewTarget(t, { nodeId: "3", promptId: "other" }), null);
    assert.equal(previewTarget(t, { nodeId: "5", promptId: "p1" }), null);
    assert.deepEqual(snapshot(t, "3"), before);
    assert.equal(t.nodes["5"], undefined);
    assert.equal(t.nodes["7"].loss, 9);
});

test("malformed messages are ignored", () => {
    const t = tracker();
    handleMessage(t, "execution_start", { prompt_id: "p1" });
    for (const [type, detail] of [
        ["fluxlora.train", null],
        ["fluxlora.train", undefined],
        ["fluxlora.train", "3"],
        ["progress", { node: { id: 3 }, prompt_id: "p1" }],
        ["execution_start", null],
        ["execution_error", 42],
        ["something_else", { node: "3", prompt_id: "p1" }],
    ]) {
        assert.deepEqual(handleMessage(t, type, detail), [], `${type} ${JSON.stringify(detail)}`);
    }
    assert.deepEqual(t.nodes, {});
    // Numbers that are not numbers are unknown, not NaN.
    handleMessage(t, "fluxlora.train", step("3", "p1", 1, null, { eta_s: "soon", it_per_s: null }));
    assert.equal(t.nodes["3"].loss, null);
    assert.equal(t.nodes["3"].eta_s, null);
    assert.deepEqual(t.nodes["3"].losses, [null]);
    assert.equal(nodeView(t.nodes["3"]).lines[1], "-- it/s · ETA --:-- · ema -- · lr 2.00e-3");
});

test("through the bridge a message for the executing node counts for the running prompt", () => {
    const t = tracker();
    handleMessage(t, "execution_start", { prompt_id: "comfy" });
    handleMessage(t, "executing", "3");
    handleMessage(t, "progress", { value: 1, max: 4, prompt_id: "comfy", node: "3" });
    assert.deepEqual(handleMessage(t, "fluxlora.train", step("3", "daemon", 1, 0.5)), ["3"]);
    handleMessage(t, "progress", { value: 2, max: 4, prompt_id: "comfy", node: "3" });
    assert.deepEqual(handleMessage(t, "fluxlora.train", step("3", "daemon", 2, 0.4)), ["3"]);
    assert.deepEqual(t.nodes["3"].losses, [0.5, 0.4]);
    assert.equal(t.nodes["3"].promptId, "comfy");
    // Once another node executes, the daemon's prompt id is not ours.
    handleMessage(t, "executing", "4");
    assert.deepEqual(handleMessage(t, "fluxlora.train", step("3", "daemon", 3, 0.3)), []);
    assert.deepEqual(handleMessage(t, "execution_success", { prompt_id: "comfy" }), ["3"]);
    assert.equal(t.nodes["3"].phase, "done");
});

test("a page opened during a run adopts its prompt; an ended prompt is never adopted", () => {
    const t = tracker();
    assert.deepEqual(handleMessage(t, "fluxlora.train", step("3", "p1", 5, 0.2)), ["3"]);
    assert.deepEqual(t.active, ["p1"]);
    assert.deepEqual(handleMessage(t, "fluxlora.train", step("3", "p2", 6, 0.2)), []);
    handleMessage(t, "execution_interrupted", { prompt_id: "p1" });
    assert.equal(t.nodes["3"].phase, "interrupted");
    assert.deepEqual(handleMessage(t, "fluxlora.train", step("3", "p1", 6, 0.2)), []);
    assert.deepEqual(t.nodes["3"].steps, [5]);
});

test("an error ends the run as failed", () => {
    const t = tracker();
    handleMessage(t, "execution_start", { prompt_id: "p1" });
    handleMessage(t, "fluxlora.train", step("3", "p1", 2, 0.5));
    assert.deepEqual(handleMessage(t, "execution_error", { prompt_id: "p1", node_id: "3" }), ["3"]);
    assert.equal(t.nodes["3"].phase, "error");
    assert.equal(nodeView(t.nodes["3"]).lines[1], "failed at step 2/4");
});

test("previews go to the node they name, or to the executing Train node", () => {
    const t = tracker();
    handleMessage(t, "execution_start", { prompt_id: "p1" });
    assert.equal(previewTarget(t, { nodeId: "3", promptId: "p1" }), "3");
    setPreview(t, "3", "blob:a");
    assert.equal(previewTarget(t, {}), null, "nothing executes");
    handleMessage(t, "executing", "7");
    assert.equal(previewTarget(t, {}), "7");
    setPreview(t, "3", "blob:b");
    assert.equal(t.nodes["3"].previewUrl, "blob:b");
    assert.equal(t.nodes["3"].previews, 2);
    handleMessage(t, "executing", "5");
    assert.equal(previewTarget(t, {}), null, "not a Train node");
});

test("ETA, rate, loss and step formatting", () => {
    assert.equal(formatDuration(0), "0:00");
    assert.equal(formatDuration(59.4), "0:59");
    assert.equal(formatDuration(125), "2:05");
    assert.equal(formatDuration(3599.6), "1:00:00");
    assert.equal(formatDuration(3723), "1:02:03");
    assert.equal(formatDuration(36000 + 60 * 5 + 9), "10:05:09");
    assert.equal(formatDuration(null), "--:--");
    assert.equal(formatDuration(-1), "--:--");
    assert.equal(formatDuration(Infinity), "--:--");
    assert.equal(formatRate(3.214), "3.21 it/s");
    assert.equal(formatRate(12.34), "12.3 it/s");
    assert.equal(formatRate(123.4), "123 it/s");
    assert.equal(formatRate(0.05), "0.05 it/s");
    assert.equal(formatRate(undefined), "-- it/s");
    assert.equal(formatLoss(0.123456), "0.1235");
    assert.equal(formatLoss(1.5), "1.500");
    assert.equal(formatLoss(0.0000123456), "0.00001235");
    assert.equal(formatLoss(NaN), "--");
    assert.equal(formatStep(12, 300), "step 12/300");
    assert.equal(formatStep(12, null), "step 12");
});

test("idle and preparing views", () => {
    assert.equal(nodeView(undefined).phase, "idle");
    const t = tracker();
    handleMessage(t, "execution_start", { prompt_id: "p1" });
    handleMessage(t, "executing", "3");
    assert.deepEqual(nodeView(t.nodes["3"]).lines, ["preparing", "waiting for the first step"]);
});

function run(losses, total = losses.length) {
    return {
        steps: losses.map((_, i) => i + 1),
        losses,
        emas: losses.map((v) => v + 0.05),
        total,
    };
}

test("chart geometry: first point at the left, a falling loss ends lower", () => {
    const g = chartGeometry(run([1.0, 0.8, 0.5, 0.2]), { width: 200, height: 100, padding: 10 });
    assert.deepEqual(g.box, { left: 10, top: 10, right: 190, bottom: 90 });
    assert.equal(g.min, 0.2);
    assert.equal(g.max, 1.05);
    assert.equal(g.loss.length, 4);
    assert.equal(g.ema.length, 4);
    const [first, last] = [g.loss[0], g.loss.at(-1)];
    assert.equal(first[0], 10);
    assert.equal(last[0], 190);
    // Canvas y grows down: the falling loss ends lower, at the bottom (the minimum).
    assert.ok(last[1] > first[1]);
    assert.equal(last[1], 90);
    assert.equal(g.ema[0][1], 10, "the largest value is at the top");
    for (const [x, y] of [...g.loss, ...g.ema]) {
        assert.ok(x >= 10 && x <= 190 && y >= 10 && y <= 90, `${x},${y} inside the box`);
    }
    for (let i = 1; i < g.loss.length; i++) assert.ok(g.loss[i][0] > g.loss[i - 1][0]);
});

test("chart geometry: a run still training fills the width up to its total", () => {
    const g = chartGeometry(run([1.0, 0.5], 11), { width: 120, height: 50, padding: { left: 10, right: 10 } });
    assert.equal(g.loss[0][0], 10);
    assert.equal(g.loss[1][0], 20, "step 2 of 1..11 is a tenth of the width");
    assert.equal(g.ema[0][1], 0, "the largest value (an EMA) is at the top");
    assert.equal(g.box.bottom, 50);
});

test("chart geometry: no points, one flat value, unknown losses", () => {
    assert.deepEqual(chartGeometry(run([]), { width: 100, height: 50 }).loss, []);
    const flat = chartGeometry({ steps: [1, 2], losses: [0.3, 0.3], emas: [null, null], total: 2 }, {
        width: 100,
        height: 50,
        padding: 0,
    });
    assert.equal(flat.loss.length, 2);
    assert.equal(flat.ema.length, 0);
    assert.equal(flat.loss[0][1], 25, "a flat line sits in the middle");
    const gaps = chartGeometry({ steps: [1, 2, 3], losses: [0.5, null, 0.1], emas: [null, null, null] }, {
        width: 100,
        height: 50,
        padding: 0,
    });
    assert.deepEqual(gaps.loss.map(([x]) => x), [0, 100]);
});

test("downsampling keeps the first and the last and at most N points", () => {
    const items = Array.from({ length: 10001 }, (_, i) => i);
    for (const n of [2, 3, 7, 100, 640]) {
        const d = downsample(items, n);
        assert.equal(d.length, n);
        assert.equal(d[0], 0);
        assert.equal(d.at(-1), 10000);
        for (let i = 1; i < d.length; i++) assert.ok(d[i] > d[i - 1], "in order, no repeats");
    }
    assert.deepEqual(downsample([1, 2, 3], 10), [1, 2, 3]);
    assert.deepEqual(downsample([1, 2, 3], 1), [1, 3], "at least the two ends");
    const long = run(Array.from({ length: 5000 }, (_, i) => 1 / (i + 1)));
    const g = chartGeometry(long, { width: 300, height: 100, padding: 0, maxPoints: 50 });
    assert.equal(g.loss.length, 50);
    assert.equal(g.loss[0][0], 0);
    assert.equal(g.loss.at(-1)[0], 300);
    assert.equal(chartGeometry(long, { width: 300, height: 100, padding: 0 }).loss.length, 300);
});
