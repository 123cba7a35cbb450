// Loads the gateway's status page in Debian's headless Chromium (driven by playwright-core, no
// browser download) and checks the rendered DOM, as a person would see it:
//   node page.js URL SCREENSHOT ONLINE_DEVICE POINT OFFLINE_DEVICE
// - a card for each device, the online one marked online, the offline one marked offline;
// - the value of ONLINE_DEVICE/POINT changes between two reads (the page refreshes itself,
//   without a reload: the same document is read twice);
// - a screenshot at SCREENSHOT.
// Prints one JSON line with what it saw; exits 0 when every check held, 1 otherwise, 2 when the
// browser could not be started. Every wait is bounded.
"use strict";
const { chromium } = require("playwright-core");

const [url, screenshot, online, point, offline] = process.argv.slice(2);
const WAIT = 20000;

async function main() {
  const seen = { checks: [] };
  const check = (name, ok, detail) => {
    seen.checks.push({ name, ok, detail });
  };
  let browser;
  try {
    browser = await chromium.launch({
      executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
      headless: true,
      args: [
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
      ],
      timeout: WAIT,
    });
  } catch (e) {
    console.log(JSON.stringify({ error: "launch: " + e.message }));
    process.exit(2);
  }
  try {
    const page = await browser.newPage({ viewport: { width: 1100, height: 800 } });
    const errors = [];
    page.on("pageerror", (e) => errors.push(String(e)));
    await page.goto(url, { timeout: WAIT });
    const card = (name) => `section.device[data-device="${name}"]`;
    await page.waitForSelector(card(online) + ".online", { timeout: WAIT });
    check("online device marked online", true);
    await page.waitForSelector(card(offline) + ".offline", { timeout: WAIT });
    check("offline device marked offline", true);
    const cell = `${card(online)} td.value[data-point="${point}"]`;
    await page.waitForFunction((sel) => {
      const e = document.querySelector(sel);
      return e && /\d/.test(e.textContent);
    }, cell, { timeout: WAIT });
    const first = await page.textContent(cell);
    const loads = await page.evaluate(() => performance.getEntriesByType("navigation").length);
    await page.waitForFunction(
      ([sel, before]) => {
        const e = document.querySelector(sel);
        return e && /\d/.test(e.textContent) && e.textContent !== before;
      },
      [cell, first],
      { timeout: WAIT },
    );
    const second = await page.textContent(cell);
    const loadsAfter = await page.evaluate(() => performance.getEntriesByType("navigation").length);
    check("value changed between two reads", first !== second, { first, second });
    check("no page reload", loads === 1 && loadsAfter === 1, { loads, loadsAfter });
    const offlineText = await page.textContent(card(offline));
    check("offline device shows its error", /last error/.test(offlineText), offlineText.slice(0, 200));
    const mqtt = await page.textContent("#mqtt");
    check("MQTT shown connected", mqtt === "connected", mqtt);
    // The poll-time plot draws once two samples are in (a sample every 2 s).
    await page.waitForSelector(`${card(online)} svg polyline`, { timeout: WAIT });
    check("poll-time plot drawn", true);
    check("no script errors", errors.length === 0, errors);
    await page.screenshot({ path: screenshot, fullPage: true });
    seen.first = first;
    seen.second = second;
  } catch (e) {
    check("page", false, e.message);
  } finally {
    await browser.close();
  }
  const ok = seen.checks.every((c) => c.ok);
  console.log(JSON.stringify(seen));
  process.exit(ok ? 0 : 1);
}

main();
