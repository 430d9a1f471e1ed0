// Drive `keel mcp` (stdio) with the official MCP TypeScript SDK (@modelcontextprotocol/sdk,
// pinned by package-lock.json, installed by scripts/setup/mcp.sh) and check what a real client sees.
//
//   node keel_client.mjs --keel KEEL --home HOME --install TEXTKIT.wasm
//
// The home has `hello` installed and a policy that denies `textkit-rust/read-file` and asks for
// approval of `textkit-rust/word-count`. Each step prints one JSON line ({"step": ...}) that the Rust
// driver (host/cli/tests/mcp_clients.rs) checks too; any failed expectation exits 1.

import { spawnSync } from "node:child_process";
import { parseArgs } from "node:util";

import { Client } from "@modelcontextprotocol/sdk/client/index.js";
import { StdioClientTransport } from "@modelcontextprotocol/sdk/client/stdio.js";
import {
  ElicitRequestSchema,
  LoggingMessageNotificationSchema,
  ToolListChangedNotificationSchema,
} from "@modelcontextprotocol/sdk/types.js";

const { values: args } = parseArgs({
  options: {
    keel: { type: "string" },
    home: { type: "string" },
    install: { type: "string" },
  },
});
const TIMEOUT_MS = 120_000;

function report(step, fields = {}) {
  console.log(JSON.stringify({ step, ...fields }));
}

function check(ok, what) {
  if (!ok) {
    report("failed", { what });
    process.exit(1);
  }
}

function keel(...argv) {
  const env = { ...process.env, KEEL_HOME: args.home };
  delete env.KEEL_LOG;
  return spawnSync(args.keel, argv, { env, encoding: "utf8", timeout: TIMEOUT_MS });
}

function waitFor(predicate, what) {
  return new Promise((resolve, reject) => {
    const started = Date.now();
    const tick = () => {
      const value = predicate();
      if (value) return resolve(value);
      if (Date.now() - started > TIMEOUT_MS) return reject(new Error(`timed out waiting for ${what}`));
      setTimeout(tick, 20);
    };
    tick();
  });
}

async function connect(capabilities = {}) {
  const client = new Client({ name: "keel-js-test", version: "1.0.0" }, { capabilities });
  const transport = new StdioClientTransport({
    command: args.keel,
    args: ["mcp"],
    env: { KEEL_HOME: args.home, PATH: process.env.PATH ?? "" },
    stderr: "inherit",
  });
  await client.connect(transport);
  return client;
}

const opts = { timeout: TIMEOUT_MS };

async function main() {
  const logs = [];
  let listChanged = false;
  const client = await connect();
  client.setNotificationHandler(LoggingMessageNotificationSchema, (n) => {
    logs.push(n.params.data);
  });
  client.setNotificationHandler(ToolListChangedNotificationSchema, () => {
    listChanged = true;
  });
  check(client.getServerVersion()?.name === "keel", "server name");

  // tools/list: hello's tool with its JSON Schema.
  let { tools } = await client.listTools();
  const greet = tools.find((t) => t.name === "hello__greet");
  check(greet, `hello__greet listed: ${tools.map((t) => t.name)}`);
  check(greet.inputSchema.properties?.name?.type === "string", "greet's schema");
  report("listed", { tools: tools.map((t) => t.name) });

  // tools/call: structured output.
  const ok = await client.callTool({ name: "hello__greet", arguments: { name: "Ada" } }, undefined, opts);
  check(!ok.isError, `greet succeeded: ${JSON.stringify(ok)}`);
  check(ok.structuredContent?.greeting === "Hello, Ada!", `greet output: ${JSON.stringify(ok)}`);
  report("called", { output: ok.structuredContent });

  // Installed while connected: notifications/tools/list_changed.
  const installed = keel("install", args.install);
  check(installed.status === 0, `keel install: ${installed.stderr}`);
  await waitFor(() => listChanged, "tools/list_changed");
  ({ tools } = await client.listTools());
  check(tools.some((t) => t.name === "textkit-rust__word-count"), "textkit listed after install");
  report("list_changed", { tools: tools.map((t) => t.name) });

  // A policy denial is an isError result with the kind, never a protocol error.
  const denied = await client.callTool(
    { name: "textkit-rust__read-file", arguments: { path: "/data/x" } },
    undefined,
    opts,
  );
  check(denied.isError === true, `denied is isError: ${JSON.stringify(denied)}`);
  check(denied.structuredContent?.error?.kind === "policy_denied", `policy_denied: ${JSON.stringify(denied)}`);
  report("denied", { error: denied.structuredContent.error });

  // Approval without elicitation: the call stays open, the log says how, another process approves.
  const pending = client.callTool(
    { name: "textkit-rust__word-count", arguments: { text: "one two three" } },
    undefined,
    opts,
  );
  const notice = await waitFor(() => logs.find((l) => l?.action_id), "the approval notice");
  check(notice.how === `keel actions approve ${notice.action_id}`, `how: ${JSON.stringify(notice)}`);
  const approved = keel("actions", "approve", notice.action_id);
  check(approved.status === 0, `keel actions approve: ${approved.stderr}`);
  const counted = await pending;
  check(!counted.isError && counted.structuredContent?.words === 3, `approved call: ${JSON.stringify(counted)}`);
  report("approved_by_cli", { action_id: notice.action_id, output: counted.structuredContent });
  await client.close();

  // A client that supports elicitation is asked, and its answer decides.
  const asking = await connect({ elicitation: {} });
  const asked = [];
  asking.setRequestHandler(ElicitRequestSchema, async (request) => {
    asked.push(request.params.message);
    return { action: "accept", content: { decision: "approve" } };
  });
  const elicited = await asking.callTool(
    { name: "textkit-rust__word-count", arguments: { text: "x y z w" } },
    undefined,
    opts,
  );
  check(asked.length === 1 && asked[0].includes("textkit-rust/word-count"), `asked once: ${asked}`);
  check(!elicited.isError && elicited.structuredContent?.words === 4, `elicited: ${JSON.stringify(elicited)}`);
  report("elicitation_approve", { output: elicited.structuredContent });
  await asking.close();
  report("done");
}

main().catch((e) => {
  report("failed", { what: String(e?.stack ?? e) });
  process.exit(1);
});
