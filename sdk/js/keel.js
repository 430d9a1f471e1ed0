// @keel/sdk — write Keel tool plugins in JavaScript.
//
// A tool is a function registered with a JSON Schema, a description and the capabilities it
// needs. `describe`, argument parsing and checking, and the mapping of thrown errors onto the WIT
// `tool-error` variant are done here. The build (`keel-build`, `node sdk/js/build.mjs`) bundles
// this module with the tool's entry file and componentizes the result with componentize-js
// against `wit/plugin.wit` (world `tool`) plus `wasi:filesystem`.

import { log as hostLog, progress as hostProgress } from 'keel:plugin/host@0.1.0';
import { getDirectories } from 'wasi:filesystem/preopens@0.2.10';

// ---------------------------------------------------------------------------------------------
// Errors

/** Base class of the errors a tool throws to report a WIT `tool-error`. */
export class ToolError extends Error {
  /** @param {string} kind WIT case name @param {string} message */
  constructor(kind, message) {
    super(message);
    this.kind = kind;
  }
  /** The WIT `tool-error` value. */
  toWit() {
    return { tag: this.kind, val: this.message };
  }
}

/** The arguments were unusable → `invalid-input`. */
export class InvalidInput extends ToolError {
  constructor(message) {
    super('invalid-input', message);
    this.name = 'InvalidInput';
  }
}

/** The tool ran and failed → `failed`. */
export class Failed extends ToolError {
  constructor(message) {
    super('failed', message);
    this.name = 'Failed';
  }
}

/** The tool gave up because its deadline passed → `timed-out`. */
export class TimedOut extends ToolError {
  constructor(message) {
    super('timed-out', message);
    this.name = 'TimedOut';
  }
}

/**
 * A capability was missing → `denied`. `capability` is `filesystem`, `network` or `environment`;
 * `target` the path, host or variable.
 */
export class Denied extends ToolError {
  constructor(capability, target, message) {
    super('denied', message ?? `no ${capability} access to ${target}`);
    this.name = 'Denied';
    this.capability = capability;
    this.target = target;
  }
  toWit() {
    return { tag: 'denied', val: { capability: this.capability, target: this.target, message: this.message } };
  }
}

// ---------------------------------------------------------------------------------------------
// Schemas: plain JSON Schema objects, a few builders, and a small checker

/** Builders for the JSON Schemas tools are declared with (plain objects work as well). */
export const schema = {
  /** A string, with an optional description. */
  string: (description) => withDescription({ type: 'string' }, description),
  /** An integer. */
  integer: (description) => withDescription({ type: 'integer' }, description),
  /** Any number. */
  number: (description) => withDescription({ type: 'number' }, description),
  /** true or false. */
  boolean: (description) => withDescription({ type: 'boolean' }, description),
  /** An array of `items`. */
  array: (items, description) => withDescription({ type: 'array', items }, description),
  /** A map from string keys to `values`. */
  map: (values, description) => withDescription({ type: 'object', additionalProperties: values }, description),
  /**
   * An object with exactly these `properties`; all are required except those named in
   * `optional`. No other properties are allowed.
   */
  object: (properties, { optional = [], description } = {}) =>
    withDescription(
      {
        type: 'object',
        properties,
        required: Object.keys(properties).filter((k) => !optional.includes(k)),
        additionalProperties: false,
      },
      description,
    ),
};

function withDescription(s, description) {
  return description === undefined ? s : { ...s, description };
}

function typeOf(value) {
  if (value === null) return 'null';
  if (Array.isArray(value)) return 'array';
  return typeof value;
}

function hasType(value, type) {
  switch (type) {
    case 'integer':
      return typeof value === 'number' && Number.isInteger(value);
    case 'number':
      return typeof value === 'number';
    case 'object':
      return typeOf(value) === 'object';
    default:
      return typeOf(value) === type;
  }
}

/**
 * Check `value` against the subset of JSON Schema the builders produce (type, properties,
 * required, additionalProperties, items, enum, minimum/maximum, minLength/maxLength).
 * Returns null when it matches, else one sentence saying where it does not.
 */
export function check(s, value, where = 'arguments') {
  if (s === true || s === undefined) return null;
  if (s === false) return `${where} is not allowed`;
  if (s.type !== undefined) {
    const types = Array.isArray(s.type) ? s.type : [s.type];
    if (!types.some((t) => hasType(value, t))) return `${where} must be ${types.join(' or ')}, not ${typeOf(value)}`;
  }
  if (s.enum !== undefined && !s.enum.some((e) => JSON.stringify(e) === JSON.stringify(value))) {
    return `${where} must be one of ${JSON.stringify(s.enum)}`;
  }
  if (typeof value === 'number') {
    if (s.minimum !== undefined && value < s.minimum) return `${where} must be at least ${s.minimum}`;
    if (s.maximum !== undefined && value > s.maximum) return `${where} must be at most ${s.maximum}`;
  }
  if (typeof value === 'string') {
    const length = [...value].length;
    if (s.minLength !== undefined && length < s.minLength) return `${where} is shorter than ${s.minLength}`;
    if (s.maxLength !== undefined && length > s.maxLength) return `${where} is longer than ${s.maxLength}`;
  }
  if (Array.isArray(value) && s.items !== undefined) {
    for (let i = 0; i < value.length; i++) {
      const problem = check(s.items, value[i], `${where}[${i}]`);
      if (problem) return problem;
    }
  }
  if (typeOf(value) === 'object') {
    for (const key of s.required ?? []) {
      if (!Object.hasOwn(value, key)) return `${where} is missing \`${key}\``;
    }
    const properties = s.properties ?? {};
    for (const [key, v] of Object.entries(value)) {
      const sub = Object.hasOwn(properties, key) ? properties[key] : s.additionalProperties;
      if (sub === false) return `${where} has unknown property \`${key}\``;
      const problem = check(sub, v, `${where}.${key}`);
      if (problem) return problem;
    }
  }
  return null;
}

// ---------------------------------------------------------------------------------------------
// Context

/** The call's context: identity, deadline, and the host's log and progress functions. */
export class Context {
  constructor(ctx) {
    /** Id of this call (the logical call: a re-run after an interruption keeps it). */
    this.callId = ctx.callId;
    /** The kernel job, if any. */
    this.jobId = ctx.jobId ?? null;
    /** Tenant scope. */
    this.scope = ctx.scope;
    /** Principal on whose behalf the call runs, if known. */
    this.principal = ctx.principal ?? null;
    /** Trace id, if any. */
    this.traceId = ctx.traceId ?? null;
    /** Milliseconds left when the call started. */
    this.deadlineMs = Number(ctx.deadlineMs);
  }
  /** Write a line to the host log: `level` is trace, debug, info, warn or error. */
  log(level, message) {
    hostLog(level, String(message));
  }
  /** Report progress: `fraction` in 0..1, or null when unknown. */
  progress(fraction, message) {
    hostProgress(fraction ?? undefined, String(message ?? ''));
  }
}

// ---------------------------------------------------------------------------------------------
// Plugins and tools

/** A handler's result as output JSON text (`undefined` is `null`). */
function outputJson(output) {
  const json = JSON.stringify(output);
  return json === undefined ? 'null' : json;
}

/** What a handler threw, as a WIT `tool-error` value. */
function witError(e) {
  if (e instanceof ToolError) return e.toWit();
  return { tag: 'failed', val: e instanceof Error ? `${e.name}: ${e.message}` : String(e) };
}

const NAME = /^[a-z0-9_-]{1,64}$/;

/** A plugin: name, version, description and the tools it offers. */
export class Plugin {
  /** @param {{name: string, version: string, description: string}} meta */
  constructor({ name, version, description }) {
    if (!NAME.test(name)) throw new Error(`plugin name \`${name}\` must match [a-z0-9_-]{1,64}`);
    this.name = name;
    this.version = version;
    this.description = description;
    this.tools = new Map();
  }

  /**
   * Register a tool. `spec`: `name`, `description`, `input` (JSON Schema of the arguments
   * object), optional `output` (JSON Schema of the result), `idempotent`, and the capabilities
   * it needs: `reads` / `writes` (guest paths), `connects` (hosts), `env` (variable names).
   * `handler(input, ctx)` returns any JSON-serializable value, or throws a `ToolError`.
   */
  tool(spec, handler) {
    if (!NAME.test(spec.name)) throw new Error(`tool name \`${spec.name}\` must match [a-z0-9_-]{1,64}`);
    if (this.tools.has(spec.name)) throw new Error(`tool \`${spec.name}\` is registered twice`);
    if (typeof handler !== 'function') throw new Error(`tool \`${spec.name}\` has no handler function`);
    this.tools.set(spec.name, { spec, handler });
    return this;
  }

  /** What `describe` returns (the WIT `plugin-info` record). */
  info() {
    return {
      name: this.name,
      version: this.version,
      description: this.description,
      tools: [...this.tools.values()].map(({ spec }) => ({
        name: spec.name,
        description: spec.description ?? '',
        inputSchema: JSON.stringify(spec.input ?? { type: 'object' }),
        outputSchema: spec.output === undefined ? undefined : JSON.stringify(spec.output),
        capabilities: {
          filesystem: [
            ...(spec.reads ?? []).map((path) => ({ path, mode: 'read' })),
            ...(spec.writes ?? []).map((path) => ({ path, mode: 'read-write' })),
          ],
          network: [...(spec.connects ?? [])],
          environment: [...(spec.env ?? [])],
        },
        idempotent: spec.idempotent === true,
      })),
    };
  }

  /**
   * Run one tool: returns the output JSON text, or throws a WIT `tool-error` value. An async
   * handler (one returning a Promise, e.g. awaiting `fetch`) gives a Promise of the same: the
   * component runs its event loop until it settles, within the call's deadline.
   */
  run(witCtx, name, argumentsJson) {
    const found = this.tools.get(name);
    if (found === undefined) throw { tag: 'unknown-tool', val: name };
    try {
      let input;
      try {
        input = JSON.parse(argumentsJson);
      } catch (e) {
        throw new InvalidInput(`arguments are not JSON: ${e.message}`);
      }
      const problem = check(found.spec.input ?? { type: 'object' }, input);
      if (problem) throw new InvalidInput(`arguments do not match the input schema: ${problem}`);
      const output = found.handler(input, new Context(witCtx));
      if (output instanceof Promise) {
        return output.then(outputJson).catch((e) => {
          throw witError(e);
        });
      }
      return outputJson(output);
    } catch (e) {
      throw witError(e);
    }
  }

  /** The component's `keel:plugin/tools` export: `export const tools = plugin.exports();`. */
  exports() {
    return {
      describe: () => this.info(),
      call: (ctx, tool, args) => {
        const json = this.run(ctx, tool, args);
        return json instanceof Promise ? json.then((text) => ({ json: text })) : { json };
      },
    };
  }
}

// ---------------------------------------------------------------------------------------------
// Filesystem (wasi:filesystem under the preopened directories the host granted)

/** Split an absolute guest path into components; `..` and relative paths are refused. */
function components(path) {
  if (typeof path !== 'string' || !path.startsWith('/')) {
    throw new Denied('filesystem', String(path), `\`${path}\` is not an absolute path`);
  }
  const parts = path.split('/').filter((p) => p !== '' && p !== '.');
  if (parts.includes('..')) throw new Denied('filesystem', path, `\`${path}\` has a \`..\` component`);
  return parts;
}

/** The granted directory holding `path` and the path relative to it. */
function locate(path) {
  const parts = components(path);
  let best = null;
  for (const [descriptor, name] of getDirectories()) {
    const root = name.split('/').filter((p) => p !== '' && p !== '.');
    if (root.length > parts.length || !root.every((p, i) => p === parts[i])) continue;
    if (best === null || root.length > best.depth) best = { descriptor, depth: root.length };
  }
  if (best === null) throw new Denied('filesystem', path, `\`${path}\` is not in a directory this tool was granted`);
  return { dir: best.descriptor, rel: parts.slice(best.depth).join('/') || '.' };
}

function fsError(e, path) {
  const code = e?.payload ?? e;
  if (code === 'access' || code === 'not-permitted' || code === 'read-only') {
    return new Denied('filesystem', path, `no permission for \`${path}\` (${code})`);
  }
  if (code === 'no-entry') return new Failed(`\`${path}\` does not exist`);
  if (e instanceof ToolError) return e;
  return new Failed(`\`${path}\`: ${typeof code === 'string' ? code : String(e)}`);
}

function wrap(path, f) {
  try {
    return f();
  } catch (e) {
    throw fsError(e, path);
  }
}

function open(path, openFlags, flags) {
  const { dir, rel } = locate(path);
  return wrap(path, () => (rel === '.' && !openFlags.create ? dir : dir.openAt({}, rel, openFlags, flags)));
}

const utf8 = new TextDecoder('utf-8', { fatal: true });

/** File system helpers over the directories the host granted (guest paths, e.g. `/data/in.txt`). */
export const fs = {
  /** The file's bytes. Missing → `Failed`; outside every grant → `Denied`. */
  readFile(path) {
    const file = open(path, {}, { read: true });
    return wrap(path, () => {
      const size = Number(file.stat().size);
      const out = new Uint8Array(size);
      let at = 0;
      for (;;) {
        const [chunk, end] = file.read(BigInt(Math.max(size - at, 65536)), BigInt(at));
        if (at + chunk.length > out.length) throw new Failed(`\`${path}\` grew while being read`);
        out.set(chunk, at);
        at += chunk.length;
        if (end || chunk.length === 0) break;
      }
      return at === size ? out : out.subarray(0, at);
    });
  },
  /** The file's text; invalid UTF-8 → `Failed`. */
  readText(path) {
    const bytes = fs.readFile(path);
    try {
      return utf8.decode(bytes);
    } catch {
      throw new Failed(`\`${path}\` is not valid UTF-8`);
    }
  },
  /** Create or replace a file with `data` (string or Uint8Array). */
  writeFile(path, data) {
    const bytes = typeof data === 'string' ? new TextEncoder().encode(data) : data;
    const file = open(path, { create: true, truncate: true }, { write: true });
    wrap(path, () => {
      let at = 0;
      while (at < bytes.length) {
        at += Number(file.write(bytes.subarray(at, at + 65536), BigInt(at)));
      }
    });
  },
  /** Create a directory (its parent must exist). */
  mkdir(path) {
    const { dir, rel } = locate(path);
    wrap(path, () => dir.createDirectoryAt(rel));
  },
  /** `{type, size}` of a path; `type` is `file`, `directory`, ... (WASI descriptor-type names). */
  stat(path) {
    const { dir, rel } = locate(path);
    const st = wrap(path, () => dir.statAt({}, rel));
    return { type: st.type === 'regular-file' ? 'file' : st.type, size: Number(st.size) };
  },
  /** The entries of a directory: `[{name, type}]`, sorted by name. */
  list(path) {
    const dir = open(path, { directory: true }, { read: true });
    return wrap(path, () => {
      const stream = dir.readDirectory();
      const entries = [];
      for (let e = stream.readDirectoryEntry(); e !== undefined; e = stream.readDirectoryEntry()) {
        entries.push({ name: e.name, type: e.type === 'regular-file' ? 'file' : e.type });
      }
      return entries.sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));
    });
  },
  /** Remove a file, or a directory and everything in it. */
  remove(path) {
    const { dir, rel } = locate(path);
    if (rel === '.') throw new Denied('filesystem', path, `\`${path}\` is a granted directory itself`);
    const st = wrap(path, () => dir.statAt({}, rel));
    if (st.type === 'directory') {
      for (const entry of fs.list(path)) fs.remove(`${path.replace(/\/+$/, '')}/${entry.name}`);
      wrap(path, () => dir.removeDirectoryAt(rel));
    } else {
      wrap(path, () => dir.unlinkFileAt(rel));
    }
  },
};
