// Node-RED settings for the peers benchmark (bench/peers.sh): the flows named by
// PEER_FLOWS (nodered-each.json or nodered-batch.json beside this file), no editor,
// listening on 127.0.0.1:PEER_NODERED_PORT. The MQTT broker node's credentials cannot
// name environment variables, so this file writes PEER_MQTT_USER/PEER_MQTT_PASSWORD into
// the user directory's credentials file (unencrypted) at every start. The rest of the
// flows' settings are ${VARIABLES} Node-RED fills in: PEER_MQTT_PORT, PEER_CLIENT_ID,
// PEER_MONGODB_URI, PEER_MONGODB_DATABASE.
//
//   node-red --settings bench/peers/settings.js --userDir DIR

const fs = require("fs");
const path = require("path");

function userDir() {
  const args = process.argv;
  const at = args.findIndex((arg) => arg === "--userDir" || arg === "-u");
  if (at < 0 || at + 1 >= args.length) {
    throw new Error("bench/peers/settings.js: start Node-RED with --userDir DIR");
  }
  return path.resolve(args[at + 1]);
}

const flows = path.resolve(__dirname, process.env.PEER_FLOWS || "nodered-each.json");
const dir = userDir();
fs.mkdirSync(dir, { recursive: true });
fs.writeFileSync(
  path.join(dir, "flows_cred.json"),
  JSON.stringify({
    "cloud-broker": { user: process.env.PEER_MQTT_USER, password: process.env.PEER_MQTT_PASSWORD },
  }),
  { mode: 0o600 },
);
// The flows file is read from the user directory: copy it there under its own name.
fs.copyFileSync(flows, path.join(dir, "flows.json"));
// Node-RED finds nodes in the user directory's node_modules: the MongoDB node is
// installed in bench/peers/node_modules.
const modules = path.join(dir, "node_modules");
if (!fs.existsSync(modules)) {
  fs.symlinkSync(path.join(__dirname, "node_modules"), modules);
}

module.exports = {
  flowFile: "flows.json",
  credentialSecret: false,
  uiHost: "127.0.0.1",
  uiPort: Number(process.env.PEER_NODERED_PORT || 1880),
  httpAdminRoot: false,
  httpNodeRoot: false,
  logging: { console: { level: "warn", metrics: false, audit: false } },
};
