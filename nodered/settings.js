// Node-RED settings for the pipeline's dashboard (nodered/flows.json).
//
// Everything that differs between machines comes from the environment (compose passes
// it from .env; scripts/dev-stack exports .env), so this file and the flows hold no
// secret and no address:
//
//   CLOUD_BROKER, CLOUD_PORT   the cloud broker the dashboard reads (localhost, 1883)
//   DASHBOARD_USERNAME         its read-only broker user (dashboard)
//   DASHBOARD_PASSWORD         that user's password (required)
//   NODERED_ADMIN_PASSWORD     password of the editor's user `admin`; without it the
//                              editor and the admin API are off and only the
//                              dashboard is served
//   NODERED_HOST, NODERED_PORT where Node-RED listens (127.0.0.1, 1880)
//   NODERED_FLOWS              the flows file (flows.json beside this file)
//
// The MQTT broker node's credentials cannot name environment variables, so at every
// start this file writes them from DASHBOARD_USERNAME/DASHBOARD_PASSWORD into the
// user directory's credentials file (unencrypted, mode 0600: the password is in .env
// as plain text anyway). Start with:
//
//   node-red --settings nodered/settings.js --userDir DIR

const crypto = require("crypto");
const fs = require("fs");
const os = require("os");
const path = require("path");

// The flows' MQTT broker config node, whose credentials are written below.
const BROKER_NODE_ID = "cloud-broker";

function fail(message) {
  // Node-RED prints a settings error with a stack; say it in one line first.
  console.error(`nodered/settings.js: ${message}`);
  throw new Error(message);
}

function required(name) {
  const value = process.env[name];
  if (!value) {
    fail(`${name} is not set: set it in .env (see .env.example)`);
  }
  return value;
}

function port(name, fallback) {
  const text = process.env[name] || String(fallback);
  const value = Number(text);
  if (!Number.isInteger(value) || value < 1 || value > 65535) {
    fail(`${name} must be a port number (1-65535), not '${text}'`);
  }
  return value;
}

// Node-RED applies --userDir after reading this file; read it here too, so the
// credentials land where Node-RED looks for them.
function userDirFromArguments() {
  const args = process.argv;
  for (let i = 0; i < args.length; i++) {
    if ((args[i] === "--userDir" || args[i] === "-u") && i + 1 < args.length) {
      return path.resolve(args[i + 1]);
    }
    if (args[i].startsWith("--userDir=")) {
      return path.resolve(args[i].slice("--userDir=".length));
    }
  }
  return path.join(os.homedir(), ".node-red");
}

const flowFile = process.env.NODERED_FLOWS || path.join(__dirname, "flows.json");
const userDir = userDirFromArguments();
const brokerPort = port("CLOUD_PORT", 1883);
const credentials = {
  [BROKER_NODE_ID]: {
    user: process.env.DASHBOARD_USERNAME || "dashboard",
    password: required("DASHBOARD_PASSWORD"),
  },
};
fs.mkdirSync(userDir, { recursive: true });
const credentialsFile = path.join(userDir, `${path.basename(flowFile, ".json")}_cred.json`);
fs.writeFileSync(credentialsFile, JSON.stringify(credentials, null, 2), { mode: 0o600 });
fs.chmodSync(credentialsFile, 0o600);
// The flows read the broker address with ${CLOUD_BROKER} and ${CLOUD_PORT}.
process.env.CLOUD_BROKER = process.env.CLOUD_BROKER || "localhost";
process.env.CLOUD_PORT = String(brokerPort);

function sameSecret(given, expected) {
  const a = crypto.createHash("sha256").update(String(given)).digest();
  const b = crypto.createHash("sha256").update(expected).digest();
  return crypto.timingSafeEqual(a, b);
}

const adminPassword = process.env.NODERED_ADMIN_PASSWORD;
const admin = { username: "admin", permissions: "*" };

module.exports = {
  flowFile,
  flowFilePretty: true,
  userDir,
  // Credentials are written in plain text above, from the environment.
  credentialSecret: false,
  uiHost: process.env.NODERED_HOST || "127.0.0.1",
  uiPort: port("NODERED_PORT", 1880),
  // Without an admin password there is no editor and no admin API at all (turning
  // off only the editor would leave the API that deploys flows open).
  httpAdminRoot: adminPassword ? "/" : false,
  disableEditor: !adminPassword,
  adminAuth: adminPassword
    ? {
        type: "credentials",
        users: (username) => Promise.resolve(username === admin.username ? admin : null),
        authenticate: (username, password) =>
          Promise.resolve(
            username === admin.username && sameSecret(password, adminPassword) ? admin : null,
          ),
      }
    : undefined,
  // The dashboard has no palette manager of its own: its nodes come from package.json.
  externalModules: { palette: { allowInstall: false } },
  diagnostics: { enabled: false },
  telemetry: { enabled: false },
  logging: { console: { level: "info", metrics: false, audit: false } },
  editorTheme: {
    projects: { enabled: false },
    tours: false,
  },
};
