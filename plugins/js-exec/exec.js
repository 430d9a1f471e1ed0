// js-exec: run a JavaScript snippet in a fresh engine and return what it printed and its value.
//
// Each call runs in a new instance of the component, so globals never survive a call, unless the
// call names a `session_id`: the host then keeps this instance (and its scratch directory) for the
// next call of that session of the same caller, and globals and files carry over. /scratch, the
// only directory it asks for, is emptied before every run outside a session.
import { Denied, Failed, InvalidInput, Plugin, ToolError, fs, schema } from '@keel/sdk';

const SCRATCH = '/scratch';
/** Bytes of stdout, and separately of stderr, a run may print. */
const MAX_PRINT = 256 * 1024;
/** Bytes of /scratch file contents returned. */
const MAX_FILES = 512 * 1024;

/** The engine's own console, captured before any script runs: it writes to this component's
 * stdout/stderr, which the host streams to a terminal for `keel exec --lang js` (the `echo` input). */
const engineConsole = globalThis.console;

/** Thrown by `process.exit(code)`: ends the script with that status (not an error). */
class Exit {
  constructor(code) {
    this.code = code;
  }
}

/** The exit status `process.exit(code)` gives, as Node computes it: an integer, else 0 for
 * `undefined`, else 1. */
function exitStatus(code) {
  if (code === undefined || code === null) return 0;
  const n = Number(code);
  return Number.isInteger(n) ? n & 0xff : 1;
}

const plugin = new Plugin({
  name: 'js-exec',
  version: '0.1.0',
  description:
    'Run JavaScript (ES2023, no Node APIs, no network) in a sandboxed engine. console.log goes to stdout; ' +
    'files live in /scratch, which starts empty on every run.',
});

/** Node-like `util.format` light: strings as they are, everything else as JSON when it can be. */
function show(value) {
  if (typeof value === 'string') return value;
  if (value instanceof Error) return value.stack ? `${value.name}: ${value.message}\n${value.stack}` : String(value);
  if (typeof value === 'function' || typeof value === 'symbol' || typeof value === 'bigint') return String(value);
  if (value === undefined) return 'undefined';
  try {
    const text = JSON.stringify(value);
    return text === undefined ? String(value) : text;
  } catch {
    return String(value);
  }
}

class Stream {
  /** `echo`: a function that also writes each line (without its final newline) as it is printed. */
  constructor(name, echo) {
    this.name = name;
    this.parts = [];
    this.bytes = 0;
    this.echo = echo;
  }
  write(text) {
    this.bytes += text.length; // UTF-16 units: a lower bound on bytes, checked before storing
    if (this.bytes > MAX_PRINT) {
      throw new Failed(`the script printed more than ${MAX_PRINT} bytes to ${this.name}`);
    }
    this.parts.push(text);
    if (this.echo) {
      try {
        // Every text written ends with a newline (see `line`), which the engine's console adds back.
        this.echo(text.endsWith('\n') ? text.slice(0, -1) : text);
      } catch {
        this.echo = undefined;
      }
    }
  }
  text() {
    return this.parts.join('');
  }
}

/** Resolve a script's path: relative paths are under /scratch. */
function scratchPath(path) {
  const p = String(path);
  return p.startsWith('/') ? p : `${SCRATCH}/${p}`;
}

/** A small Node-style `fs` over /scratch for scripts. */
const scriptFs = Object.freeze({
  readFileSync(path, encoding) {
    const bytes = fs.readFile(scratchPath(path));
    return encoding ? new TextDecoder().decode(bytes) : bytes;
  },
  writeFileSync(path, data) {
    fs.writeFile(scratchPath(path), typeof data === 'string' || data instanceof Uint8Array ? data : String(data));
  },
  appendFileSync(path, data) {
    let old = new Uint8Array();
    try {
      old = fs.readFile(scratchPath(path));
    } catch (e) {
      if (!(e instanceof Failed)) throw e;
    }
    const add = new TextEncoder().encode(String(data));
    const all = new Uint8Array(old.length + add.length);
    all.set(old);
    all.set(add, old.length);
    fs.writeFile(scratchPath(path), all);
  },
  existsSync(path) {
    try {
      fs.stat(scratchPath(path));
      return true;
    } catch (e) {
      if (e instanceof Denied) throw e;
      return false;
    }
  },
  readdirSync(path = SCRATCH) {
    return fs.list(scratchPath(path)).map((e) => e.name);
  },
  mkdirSync(path) {
    fs.mkdir(scratchPath(path));
  },
  rmSync(path) {
    fs.remove(scratchPath(path));
  },
  unlinkSync(path) {
    fs.remove(scratchPath(path));
  },
});

/** Every file under `dir` as `[path, bytes]`. */
function walk(dir, out) {
  for (const entry of fs.list(dir)) {
    const path = `${dir}/${entry.name}`;
    if (entry.type === 'directory') walk(path, out);
    else if (entry.type === 'file') out.push(path);
  }
  return out;
}

/** The entries of /scratch, or `undefined` when it was not granted: one directory read tells both
 * (the host usually gives a fresh empty directory). */
function scratchEntries() {
  try {
    return fs.list(SCRATCH);
  } catch {
    return undefined;
  }
}

plugin.tool(
  {
    name: 'run',
    description:
      'Run a JavaScript script and return {stdout, stderr, value, files, error}: value is the completion value ' +
      '(JSON when it can be encoded), files the contents of /scratch afterwards, error the uncaught exception. ' +
      'Scripts get `stdin` (a string) and a small Node-like `fs` (readFileSync, writeFileSync, readdirSync, ...) ' +
      'over /scratch; there is no network, no require and no event loop. `process.exit(n)` ends the script ' +
      'with status n (`exit_code`; an uncaught exception is 1).',
    input: schema.object(
      {
        code: schema.string('The script (evaluated as a classic script; its last expression is the value).'),
        stdin: schema.string('Text the script reads as the global `stdin`.'),
        files: schema.map(schema.string(), 'Files to create in /scratch first: relative path → text.'),
        session_id: schema.string(
          'Keep globals and /scratch for the next run with the same id (idle sessions expire; `var` and ' +
            'undeclared globals carry over, top-level `let`/`const` do not).',
        ),
        echo: schema.boolean(
          "Also write the output to this component's own stdout/stderr as it is printed " +
            '(`keel exec --lang js` streams them to the terminal).',
        ),
      },
      { optional: ['stdin', 'files', 'session_id', 'echo'] },
    ),
    writes: [SCRATCH],
    idempotent: false,
  },
  ({ code, stdin, files, session_id, echo }) => {
    const entries = scratchEntries();
    const scratch = entries !== undefined;
    if (scratch && session_id === undefined) {
      for (const entry of entries) fs.remove(`${SCRATCH}/${entry.name}`);
    }
    for (const [name, text] of Object.entries(files ?? {})) {
      if (name.startsWith('/') || name.split('/').includes('..')) {
        throw new InvalidInput(`file name \`${name}\` must be relative to /scratch, without \`..\``);
      }
      if (!scratch) throw new Denied('filesystem', SCRATCH, 'files need /scratch, which was not granted');
      const parts = name.split('/');
      for (let i = 1; i < parts.length; i++) {
        const dir = `${SCRATCH}/${parts.slice(0, i).join('/')}`;
        if (!scriptFs.existsSync(dir)) fs.mkdir(dir);
      }
      fs.writeFile(`${SCRATCH}/${name}`, text);
    }

    const stdout = new Stream('stdout', echo === true ? (text) => engineConsole.log(text) : undefined);
    const stderr = new Stream('stderr', echo === true ? (text) => engineConsole.error(text) : undefined);
    const line = (stream) => (...args) => stream.write(`${args.map(show).join(' ')}\n`);
    globalThis.console = Object.freeze({
      log: line(stdout),
      info: line(stdout),
      debug: line(stdout),
      warn: line(stderr),
      error: line(stderr),
    });
    // Built without wasi:http, the engine's `fetch` is a stub that traps: remove it, so a script
    // sees plainly that there is no network.
    delete globalThis.fetch;
    globalThis.stdin = stdin ?? '';
    globalThis.fs = scriptFs;
    // Only `exit` and `argv` of Node's `process`: enough for scripts that end with a status.
    globalThis.process = Object.freeze({
      argv: Object.freeze(['js-exec']),
      exit(status) {
        throw new Exit(exitStatus(status));
      },
    });

    const result = {};
    let error;
    let status = 0;
    try {
      const value = (0, eval)(code);
      if (value !== undefined && typeof value !== 'function' && typeof value !== 'symbol') {
        try {
          const json = JSON.stringify(value);
          if (json !== undefined) result.value = JSON.parse(json);
        } catch {
          result.value_text = String(value);
        }
        if (value instanceof Promise) {
          delete result.value;
          result.value_text = '[object Promise] (promises are not awaited: there is no event loop)';
        }
      }
    } catch (e) {
      // Capability denials and the output cap stop the run as tool errors; the script's own
      // exceptions (and `process.exit`) are its result.
      if (e instanceof ToolError) throw e;
      if (e instanceof Exit) {
        status = e.code;
        if (status !== 0) error = `process.exit(${status})`;
      } else {
        status = 1;
        const summary = e instanceof Error ? `${e.name}: ${e.message}` : show(e);
        error = e instanceof Error ? summary : `uncaught ${summary}`;
        // As a `node` process does: the uncaught exception is reported on stderr.
        try {
          stderr.write(`Uncaught ${summary}\n`);
        } catch (full) {
          if (!(full instanceof Failed)) throw full;
        }
      }
    }

    const out = { stdout: stdout.text(), stderr: stderr.text(), ...result, files: {}, exit_code: status };
    if (scratch) {
      let total = 0;
      for (const path of walk(SCRATCH, [])) {
        const bytes = fs.readFile(path);
        total += bytes.length;
        if (total > MAX_FILES) throw new Failed(`/scratch holds more than ${MAX_FILES} bytes after the run`);
        out.files[path] = new TextDecoder().decode(bytes);
      }
    }
    if (error !== undefined) out.error = error;
    return out;
  },
);

export const tools = plugin.exports();
