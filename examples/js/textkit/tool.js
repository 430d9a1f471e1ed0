// textkit in JavaScript: the shared example tool set (see examples/README or sdk/js/README.md).
import { Denied, Failed, Plugin, fs, schema } from '@keel/sdk';

const plugin = new Plugin({
  name: 'textkit-js',
  version: '0.1.0',
  description: 'Text utilities: count words, read a text file under /data.',
});

// ASCII whitespace: space, \t, \n, \v, \f, \r.
const SPACE = new Set([' ', '\t', '\n', '\x0b', '\x0c', '\r']);

plugin.tool(
  {
    name: 'word-count',
    description: 'Count the characters (Unicode scalar values), lines and words of a text.',
    input: schema.object({ text: schema.string('The text to count.') }),
    output: schema.object({ chars: schema.integer(), lines: schema.integer(), words: schema.integer() }),
    idempotent: true,
  },
  ({ text }) => {
    let chars = 0;
    let newlines = 0;
    let words = 0;
    let inWord = false;
    for (const c of text) {
      chars++;
      if (c === '\n') newlines++;
      if (SPACE.has(c)) {
        inWord = false;
      } else if (!inWord) {
        inWord = true;
        words++;
      }
    }
    const lines = newlines + (text.length > 0 && !text.endsWith('\n') ? 1 : 0);
    return { chars, lines, words };
  },
);

plugin.tool(
  {
    name: 'read-file',
    description: 'Read a UTF-8 text file under /data.',
    input: schema.object({ path: schema.string('Absolute path of a file under /data.') }),
    output: schema.object({ bytes: schema.integer(), path: schema.string(), text: schema.string() }),
    reads: ['/data'],
    idempotent: true,
  },
  ({ path }) => {
    if (!path.startsWith('/data/') || path.split('/').includes('..')) {
      throw new Denied('filesystem', path, `\`${path}\` is not a file under /data`);
    }
    const bytes = fs.readFile(path);
    let text;
    try {
      text = new TextDecoder('utf-8', { fatal: true }).decode(bytes);
    } catch {
      throw new Failed(`\`${path}\` is not valid UTF-8`);
    }
    return { bytes: bytes.length, path, text };
  },
);

export const tools = plugin.exports();
