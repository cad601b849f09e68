// The dashboard in a real browser: Debian's Chromium driven by
// playwright-core, against a running `majordome up` with the fake plugin.
//
//   node tools/e2e/dashboard.mjs http://127.0.0.1:40406 target/e2e-screenshots
//
// It checks what a person would see: a value that changes without a
// reload, the fake switch flipped from its card, the dimmer's slider, a
// config change and a refused one, the fake plugin stopped and started
// from its page; then it saves screenshots of every page at desktop and
// phone sizes. Each step prints one line; the first failure ends the run
// with a non-zero status and says what was expected.

import { chromium } from "playwright-core";
import { mkdirSync } from "node:fs";
import { join } from "node:path";

const [base, shots = "target/e2e-screenshots"] = process.argv.slice(2);
if (!base) {
  console.error("usage: node dashboard.mjs BASE_URL [SCREENSHOT_FOLDER]");
  process.exit(2);
}
const browserPath = process.env.CHROMIUM || "/usr/bin/chromium";
// How long any one thing may take to show (a slow, shared machine).
const WAIT = 30_000;

function step(text) {
  console.log(`ok - ${text}`);
}

// The toast that says how the last action went; a failure ends the run.
async function toast(page, expected) {
  const box = page.locator("#toast.show", { hasText: expected });
  try {
    await box.waitFor({ timeout: WAIT });
  } catch (e) {
    const said = await page.locator("#toast").textContent().catch(() => "nothing");
    throw new Error(`expected a toast saying ${expected}, the page said: ${said}`);
  }
}

async function json(path) {
  const response = await fetch(base + path);
  if (!response.ok) throw new Error(`${path}: HTTP ${response.status}`);
  return response.json();
}

// The fake plugin's devices, by type, once the devices service has them.
async function fakeDevices() {
  const deadline = Date.now() + WAIT;
  for (;;) {
    const { devices } = await json("/api/devices");
    const byType = {};
    for (const device of devices) if (device.client.startsWith("plugin-fake.")) byType[device.type] = device;
    if (byType.switch && byType.dimmer && byType.temperaturesensor) return byType;
    if (Date.now() > deadline) throw new Error("the fake plugin's devices never appeared");
    await new Promise((r) => setTimeout(r, 200));
  }
}

const browser = await chromium.launch({
  executablePath: browserPath,
  // As root, without a sandbox; nothing in the background that would
  // knock on the closed network.
  args: [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
  ],
});
let failed = false;
try {
  const devices = await fakeDevices();
  const fake = devices.switch.client;
  const thermometer = devices.temperaturesensor.uuid;
  const desktop = await browser.newPage({ viewport: { width: 1280, height: 900 } });
  const problems = [];
  desktop.on("pageerror", (e) => problems.push(e.message));
  desktop.on("console", (m) => m.type() === "error" && problems.push(m.text()));

  // The fake plugin reads every device each second from here on: set
  // through its config form, as a person would.
  await desktop.goto(`${base}/plugins/${fake}`);
  await desktop.fill("#field-interval", "1");
  await desktop.click("form.config button[type=submit]");
  await toast(desktop, "Saved");
  step("the config form saves the fake plugin's interval");

  // A value out of the manifest's bounds is refused by the browser (the
  // field's max) and, sent anyway, by the config service.
  await desktop.fill("#field-interval", "99999");
  const valid = await desktop.$eval("#field-interval", (input) => input.checkValidity());
  if (valid) throw new Error("the browser let an interval of 99999 through (max is 3600)");
  const refused = await desktop.evaluate(async (action) => {
    const response = await fetch(action, {
      method: "POST",
      body: new URLSearchParams({ interval: "99999" }),
      headers: { Accept: "application/json" },
    });
    return { status: response.status, answer: await response.json() };
  }, `/ui/plugins/${fake}/config`);
  if (refused.status !== 400 || !/between 0.05 and 3600/.test(refused.answer.message)) {
    throw new Error(`an interval of 99999 was not refused by its bounds: ${JSON.stringify(refused)}`);
  }
  // The browser logs that refusal as a failed load: expected, forgotten.
  problems.length = 0;
  step(`an interval beyond the manifest's bounds is refused: "${refused.answer.message}"`);

  // A live value: the thermometer's changes on the home page, which is
  // not loaded again (the marker on window survives).
  await desktop.goto(`${base}/`);
  await desktop.locator(".live[data-state=on]").waitFor({ timeout: WAIT });
  const value = desktop.locator(`[data-value="${thermometer}/temperature"]`);
  const before = await value.textContent();
  await desktop.evaluate(() => (window.notReloaded = true));
  await desktop.waitForFunction(
    ([selector, old]) => document.querySelector(selector).textContent !== old,
    [`[data-value="${thermometer}/temperature"]`, before],
    { timeout: WAIT },
  );
  const after = await value.textContent();
  if (!(await desktop.evaluate(() => window.notReloaded))) throw new Error("the page was loaded again");
  step(`the thermometer went from ${before} to ${after} without a reload`);

  // The fake switch, flipped from its card: its state follows.
  const uuid = devices.switch.uuid;
  const toggle = desktop.locator(`button[data-toggle="${uuid}/state"]`);
  const state = desktop.locator(`[data-value="${uuid}/state"]`);
  const wasOn = (await toggle.getAttribute("aria-checked")) === "true";
  await toggle.click();
  const want = wasOn ? "Off" : "On";
  await desktop.locator(`[data-value="${uuid}/state"]`, { hasText: want }).waitFor({ timeout: WAIT });
  await desktop.locator(`button[data-toggle="${uuid}/state"][aria-checked="${!wasOn}"]`).waitFor({ timeout: WAIT });
  step(`the fake switch flipped to ${await state.textContent()}`);
  await toggle.click();
  await desktop.locator(`[data-value="${uuid}/state"]`, { hasText: wasOn ? "On" : "Off" }).waitFor({ timeout: WAIT });
  step("and back");

  // The dimmer's slider: let go at 40, the dimmer reports 40.
  const dimmer = devices.dimmer.uuid;
  const slider = desktop.locator(`input[data-level="${dimmer}/state"]`);
  await slider.evaluate((input) => {
    input.value = "40";
    input.dispatchEvent(new Event("input", { bubbles: true }));
    input.dispatchEvent(new Event("change", { bubbles: true }));
  });
  await desktop.locator(`[data-value="${dimmer}/state"]`, { hasText: /^40$/ }).waitFor({ timeout: WAIT });
  step("the dimmer's slider set it to 40");

  // The fake plugin stopped, then started, from its page.
  await desktop.goto(`${base}/plugins/${fake}`);
  const badge = desktop.locator(`[data-client="${fake}"] .status`).first();
  await desktop.click(`[data-client="${fake}"] button[data-when=running]`);
  await toast(desktop, "Stopping");
  await desktop.locator(`[data-client="${fake}"] .status[data-status=stopped]`).first().waitFor({ timeout: WAIT });
  step(`Stop: the fake plugin is ${await badge.textContent()}`);
  await desktop.locator(`[data-client="${fake}"] button[data-when=stopped]:not([disabled])`).waitFor({ timeout: WAIT });
  await desktop.click(`[data-client="${fake}"] button[data-when=stopped]`);
  await toast(desktop, "Starting");
  await desktop.locator(`[data-client="${fake}"] .status[data-status=alive]`).first().waitFor({ timeout: WAIT });
  step(`Start: the fake plugin is ${await badge.textContent()}`);
  await desktop.locator("pre.log", { hasText: "majordome runs" }).waitFor({ timeout: WAIT });
  step("its log shows the start");

  // A scenario, made through the API, run from its card: its last
  // result shows up without a reload.
  const made = await fetch(`${base}/api/scenarios`, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({
      name: "evening",
      description: "The switch on, a second later off",
      actions: [
        { action: "command", device: uuid, command: "on" },
        { action: "delay", seconds: 1 },
        { action: "command", device: uuid, command: "off" },
      ],
    }),
  });
  if (!made.ok) throw new Error(`the scenario was not made: ${await made.text()}`);
  await desktop.goto(`${base}/scenarios`);
  await desktop.click('article[data-scenario="evening"] button.primary');
  await toast(desktop, "Started evening");
  await desktop
    .locator('article[data-scenario="evening"] [data-field=last_result] .result[data-result=ok]')
    .waitFor({ timeout: WAIT });
  step("the scenario ran from its card and says ok");
  await desktop.click('article[data-scenario="evening"] button.switch');
  await desktop.locator('article[data-scenario="evening"] button.switch[aria-checked=false]').waitFor({ timeout: WAIT });
  step("and was disabled from it");

  if (problems.length) throw new Error(`the page said: ${problems.join("; ")}`);

  // Screenshots of every page, desktop and phone.
  mkdirSync(shots, { recursive: true });
  const pages = [
    ["home", "/"],
    ["device", `/devices/${thermometer}?range=1h`],
    ["plugins", "/plugins"],
    ["plugin", `/plugins/${fake}`],
    ["scenarios", "/scenarios"],
    ["scenario", "/scenarios/evening"],
    ["bus", "/bus"],
  ];
  const phone = await browser.newPage({ viewport: { width: 390, height: 844 }, isMobile: true, hasTouch: true });
  for (const [size, page] of [["desktop", desktop], ["phone", phone]]) {
    for (const [name, path] of pages) {
      await page.goto(base + path);
      await page.locator(".live[data-state=on]").waitFor({ timeout: WAIT });
      // Nothing wider than the screen: no sideways scrolling on a phone.
      const overflow = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
      if (overflow > 0) throw new Error(`${name} is ${overflow}px wider than a ${size} screen`);
      const file = join(shots, `${name}-${size}.png`);
      await page.screenshot({ path: file, fullPage: true });
      step(`screenshot ${file}`);
    }
  }
} catch (error) {
  failed = true;
  console.log(`not ok - ${error.message}`);
} finally {
  await browser.close();
}
process.exit(failed ? 1 : 0);
