// Unit tests of nodered/flows.json: the code of its function nodes, run on the messages
// the pipeline sends, and the wiring of the flow. Run with: node --test nodered/test/
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { test } from "node:test";

const flows = JSON.parse(readFileSync(new URL("../flows.json", import.meta.url), "utf8"));
const byId = new Map(flows.map((node) => [node.id, node]));

// A function node's code with the parts of Node-RED's sandbox it uses: `node.warn`
// and its own `context`.
function functionNode(id) {
  const config = byId.get(id);
  assert.equal(config?.type, "function", `${id} is a function node`);
  const run = new Function("msg", "node", "context", config.func);
  const store = new Map();
  const warnings = [];
  const node = { warn: (text) => warnings.push(text) };
  const context = { get: (key) => store.get(key), set: (key, value) => store.set(key, value) };
  return { warnings, send: (msg) => run(structuredClone(msg), node, context) };
}

test("a plain reading goes to its gauge and chart and to the table", () => {
  const decode = functionNode("decode-reading");
  const [temperature, pressure, row] = decode.send({ topic: "/sensor/temperature", payload: "23.41" });
  assert.deepEqual(temperature, { payload: 23.41, topic: "temperature" });
  assert.equal(pressure, null);
  assert.equal(row.payload.value, 23.41);
  assert.equal(row.payload.topic, "/sensor/temperature");
  assert.equal(row.payload.unit, "°C");
});

test("a JSON reading keeps its device, device time and unit", () => {
  const decode = functionNode("decode-reading");
  const payload = JSON.stringify({
    device: "press-0001", boot: "k3x9q2", seq: 42, ts: "2026-11-24T10:00:00.123Z", value: 1001.25, unit: "hPa",
  });
  const [temperature, pressure, row] = decode.send({ topic: "/sensor/pressure", payload });
  assert.equal(temperature, null);
  assert.deepEqual(pressure, { payload: 1001.25, topic: "press-0001" });
  assert.deepEqual(row.payload, {
    time: "2026-11-24 10:00:00", topic: "/sensor/pressure", device: "press-0001", value: 1001.25, unit: "hPa",
  });
});

test("a fleet topic names the device and the kind", () => {
  const decode = functionNode("decode-reading");
  const [temperature, , row] = decode.send({ topic: "/sensor/temp-0007/temperature", payload: "21.00" });
  assert.deepEqual(temperature, { payload: 21, topic: "temp-0007" });
  assert.equal(row.payload.device, "temp-0007");
});

test("another sensor kind is listed in the table only", () => {
  const decode = functionNode("decode-reading");
  const [temperature, pressure, row] = decode.send({ topic: "/sensor/humidity", payload: "40.5" });
  assert.equal(temperature, null);
  assert.equal(pressure, null);
  assert.equal(row.payload.value, 40.5);
  assert.equal(row.payload.unit, "");
});

test("anything that is not a reading is dropped with a warning", () => {
  const decode = functionNode("decode-reading");
  for (const payload of ["", "hello", "NaN", "1e999", '{"value":"23"}', "[1,2]", "{", "null"]) {
    assert.equal(decode.send({ topic: "/sensor/temperature", payload }), null, payload);
  }
  assert.equal(decode.warnings.length, 8);
  assert.match(decode.warnings[1], /not a reading on \/sensor\/temperature: hello/);
});

test("the table keeps the newest 20 readings, newest first", () => {
  const keep = functionNode("keep-last-readings");
  let shown;
  for (let i = 1; i <= 25; i++) {
    shown = keep.send({ payload: { value: i } });
  }
  assert.equal(shown.payload.length, 20);
  assert.equal(shown.payload[0].value, 25);
  assert.equal(shown.payload[19].value, 6);
});

test("device presence shows each device with the time of its last change", () => {
  const presence = functionNode("device-presence");
  const first = presence.send({ topic: "/device/status", payload: "online", retain: true });
  assert.equal(first.payload.length, 1);
  assert.equal(first.payload[0].device, "/device/status");
  assert.equal(first.payload[0].status, "online");
  assert.match(first.payload[0].since, /^before \d{4}-\d\d-\d\d \d\d:\d\d:\d\d$/);

  // The refresh every 30 s is no change.
  const again = presence.send({ topic: "/device/status", payload: "online" });
  assert.equal(again.payload[0].since, first.payload[0].since);

  const fleet = presence.send({ topic: "/device/gateway-02/status", payload: "online" });
  assert.deepEqual(fleet.payload.map((d) => d.device), ["/device/status", "gateway-02"]);

  const will = presence.send({ topic: "/device/status", payload: "offline" });
  assert.equal(will.payload[0].status, "offline");
  assert.match(will.payload[0].since, /^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d$/);

  assert.equal(presence.send({ topic: "/device/status", payload: "rebooting" }), null);
  assert.equal(presence.warnings.length, 1);
});

test("every wire leads to a node of the flow", () => {
  for (const node of flows) {
    for (const target of (node.wires ?? []).flat()) {
      assert.ok(byId.has(target), `${node.id} is wired to ${target}, which does not exist`);
    }
  }
});

test("the flow reads the cloud broker named by the environment, with no secret in it", () => {
  const broker = byId.get("cloud-broker");
  assert.equal(broker.broker, "${CLOUD_BROKER}");
  assert.equal(broker.port, "${CLOUD_PORT}");
  const inputs = flows.filter((node) => node.type === "mqtt in");
  assert.deepEqual(inputs.map((node) => node.topic).sort(), ["/device/#", "/sensor/#"]);
  for (const input of inputs) {
    assert.equal(input.broker, "cloud-broker");
  }
  for (const node of flows) {
    assert.equal(node.credentials, undefined, `${node.id} carries credentials`);
  }
  assert.doesNotMatch(JSON.stringify(flows), /change-me/);
});
