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
  constructor(name) {
    this.name = name;
    this.parts = [];
    this.bytes = 0;
  }
  write(text) {
    this.bytes += text.length; // UTF-16 units: a lower bound on bytes, checked before storing
    if (this.bytes > MAX_PRINT) {
      throw new Failed(`the script printed more than ${MAX_PRINT} bytes to ${this.name}`);
    }
    this.parts.push(text);
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

function scratchAvailable() {
  try {
    fs.stat(SCRATCH);
    return true;
  } catch {
    return false;
  }
}

plugin.tool(
  {
    name: 'run',
    description:
      'Run a JavaScript script and return {stdout, stderr, value, files, error}: value is the completion value ' +
      '(JSON when it can be encoded), files the contents of /scratch afterwards, error the uncaught exception. ' +
      'Scripts get `stdin` (a string) and a small Node-like `fs` (readFileSync, writeFileSync, readdirSync, ...) ' +
      'over /scratch; there is no network, no require and no event loop.',
    input: schema.object(
      {
        code: schema.string('The script (evaluated as a classic script; its last expression is the value).'),
        stdin: schema.string('Text the script reads as the global `stdin`.'),
        files: schema.map(schema.string(), 'Files to create in /scratch first: relative path → text.'),
        session_id: schema.string(
          'Keep globals and /scratch for the next run with the same id (idle sessions expire; `var` and ' +
            'undeclared globals carry over, top-level `let`/`const` do not).',
        ),
      },
      { optional: ['stdin', 'files', 'session_id'] },
    ),
    writes: [SCRATCH],
    idempotent: false,
  },
  ({ code, stdin, files, session_id }) => {
    const scratch = scratchAvailable();
    if (scratch && session_id === undefined) {
      for (const entry of fs.list(SCRATCH)) fs.remove(`${SCRATCH}/${entry.name}`);
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

    const stdout = new Stream('stdout');
    const stderr = new Stream('stderr');
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

    const result = {};
    let error;
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
      // exceptions are its result.
      if (e instanceof ToolError) throw e;
      error = e instanceof Error ? `${e.name}: ${e.message}` : `uncaught ${show(e)}`;
    }

    const out = { stdout: stdout.text(), stderr: stderr.text(), ...result, files: {} };
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
