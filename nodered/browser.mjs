// A headless Chromium driven by the end-to-end tests (tests/tests/dashboard.rs), one
// JSON command per line on stdin, one JSON answer per line on stdout:
//
//   {"open": URL}                                   load a page
//   {"wait_text": SELECTOR, "text": T, "timeout_ms": N}
//                                                   wait until an element matching
//                                                   SELECTOR shows T; answers its text
//   {"text": SELECTOR}                              the text of every match
//   {"screenshot": PATH}                            a PNG of the whole page, taken
//                                                   once the gauges' animation (under
//                                                   a second) has settled
//
// Answers: {"ok": true, ...} or {"ok": false, "error": "..."}. The browser is Debian's
// chromium (CHROMIUM, default /usr/bin/chromium): playwright-core downloads nothing.
import { createInterface } from "node:readline";
import { chromium } from "playwright-core";

const executablePath = process.env.CHROMIUM || "/usr/bin/chromium";
const browser = await chromium.launch({
  executablePath,
  headless: true,
  // --no-sandbox: the tests run as root; the rest keeps Chromium off the network.
  args: [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
    "--no-first-run",
  ],
});
const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
const pageErrors = [];
page.on("pageerror", (error) => pageErrors.push(String(error)));

async function answer(command) {
  if (command.open) {
    await page.goto(command.open, { waitUntil: "load" });
    return { url: page.url() };
  }
  if (command.wait_text) {
    const locator = page.locator(command.wait_text).filter({ hasText: command.text });
    await locator.first().waitFor({ timeout: command.timeout_ms ?? 20000 });
    return { text: await locator.first().innerText() };
  }
  if (command.text) {
    return { texts: await page.locator(command.text).allInnerTexts() };
  }
  if (command.screenshot) {
    await page.waitForTimeout(1500);
    await page.screenshot({ path: command.screenshot, fullPage: true });
    return {};
  }
  throw new Error(`unknown command: ${JSON.stringify(command)}`);
}

const lines = createInterface({ input: process.stdin });
for await (const line of lines) {
  if (!line.trim()) continue;
  let reply;
  try {
    reply = { ok: true, ...(await answer(JSON.parse(line))) };
  } catch (error) {
    const errors = pageErrors.length ? ` (page errors: ${pageErrors.join("; ")})` : "";
    reply = { ok: false, error: `${error.message}${errors}`, texts: await visibleText() };
  }
  process.stdout.write(`${JSON.stringify(reply)}\n`);
}
await browser.close();

// What the page shows, to explain a failed wait.
async function visibleText() {
  try {
    return [await page.locator("body").innerText()];
  } catch {
    return [];
  }
}
