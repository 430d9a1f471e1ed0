#!/usr/bin/env node
// Build a JavaScript (or TypeScript) Keel tool into a `keel:plugin` component.
//
//   node sdk/js/build.mjs ENTRY WIT_DIR WORLD OUT.wasm [--http]
//
// Normally run by `keel-build` (`keel_build::js::build`), which checks the project, assembles
// WIT_DIR (Keel's `wit/plugin.wit` plus `sdk/js/wit`) and reports errors. Steps:
// 1. bundle ENTRY with rolldown into one ES module; `@keel/sdk` resolves to this directory's
//    `keel.js`, and WIT imports (`keel:plugin/host@0.1.0`, `wasi:...`) stay imports;
// 2. componentize the bundle with componentize-js against WORLD (no AOT: it downloads);
//    `fetch` (wasi:http) is left out unless `--http` is given, so the component cannot reach the
//    network at all.

import { writeFile, mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

import { componentize } from '@bytecodealliance/componentize-js';
import { rolldown } from 'rolldown';

const here = dirname(fileURLToPath(import.meta.url));
const [entry, witDir, world, out, ...flags] = process.argv.slice(2);
if (!entry || !witDir || !world || !out) {
  console.error('usage: node build.mjs ENTRY WIT_DIR WORLD OUT.wasm [--http]');
  process.exit(2);
}

const work = await mkdtemp(join(tmpdir(), 'keel-js-'));
try {
  const bundle = await rolldown({
    input: resolve(entry),
    resolve: { alias: { '@keel/sdk': join(here, 'keel.js') } },
    external: [/^[a-z][a-z0-9-]*:[a-z]/],
    logLevel: 'warn',
    onwarn(warning) {
      console.error(`warning: ${warning.message}`);
    },
  });
  const { output } = await bundle.generate({ format: 'esm' });
  await bundle.close();
  const source = join(work, 'tool.js');
  await writeFile(source, output[0].code);

  const disableFeatures = flags.includes('--http') ? [] : ['http', 'fetch-event'];
  const { component } = await componentize({
    sourcePath: source,
    witPath: resolve(witDir),
    worldName: world,
    disableFeatures,
  });
  await writeFile(out, component);
} catch (e) {
  console.error(e?.message ?? String(e));
  process.exitCode = 1;
} finally {
  await rm(work, { recursive: true, force: true });
}
