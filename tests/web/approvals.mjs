// Drives the approvals page of a running `keel serve` in headless Chromium (run by
// host/server/tests/web.rs, which creates the job and checks it completes).
//
// Protocol on stdout, one line each: READY (signed in, nothing pending), CLICKED (the approval
// card appeared live and Approve was clicked), DONE (the page shows nothing pending again).
// Environment: KEEL_URL, KEEL_KEY, KEEL_JOB_FILE (the job id appears there once created),
// CHROMIUM (default /usr/bin/chromium).
import { readFileSync, existsSync } from "node:fs";
import { chromium } from "playwright-core";

const base = process.env.KEEL_URL;
const key = process.env.KEEL_KEY;
const jobFile = process.env.KEEL_JOB_FILE;
const timeout = 30000;

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--no-sandbox"],
});
try {
  const page = await browser.newPage();
  page.on("pageerror", (e) => console.error("page error:", e.message));
  await page.goto(base + "/");
  await page.fill("#key", key, { timeout });
  await page.click("#signin");
  await page.getByText("No pending approvals.").waitFor({ timeout });
  // The session is an HttpOnly cookie: the page's script cannot read it.
  const visible = await page.evaluate(() => document.cookie);
  if (visible !== "") throw new Error("the session cookie is readable by script: " + visible);
  console.log("READY");

  // The job is created now, after the page loaded: its card must arrive live (SSE).
  const started = Date.now();
  while (!existsSync(jobFile) || readFileSync(jobFile, "utf8").trim() === "") {
    if (Date.now() - started > timeout) throw new Error("no job id");
    await new Promise((r) => setTimeout(r, 20));
  }
  const job = readFileSync(jobFile, "utf8").trim();
  const card = page.locator(".card", { hasText: "hello/greet" });
  await card.waitFor({ timeout });
  const text = await card.innerText();
  if (!text.includes(job)) throw new Error("the card does not name the job " + job + ": " + text);
  if (!text.includes('"name": "Ada"')) throw new Error("the card does not show the arguments: " + text);
  await card.getByRole("button", { name: "Approve", exact: true }).click();
  console.log("CLICKED");
  await page.getByText("No pending approvals.").waitFor({ timeout });
  console.log("DONE");
} finally {
  await browser.close();
}
