#!/usr/bin/env node
// Build a JavaScript (or TypeScript) Keel tool project into a `keel:plugin` component.
//
//   node sdk/js/build.mjs PROJECT_DIR OUT.wasm [--plugin-wit FILE]
//
// PROJECT_DIR holds a package.json whose `main` names the entry file (default index.js).
// `keel_build::js::build` runs this (passing the Keel WIT it was compiled with); run by hand, the
// WIT is this repository's `wit/plugin.wit`. Steps:
// 1. bundle the entry with rolldown into one ES module; `@keel/sdk` resolves to this directory's
//    `keel.js`, and WIT imports (`keel:plugin/host@0.1.0`, `wasi:...`) stay imports;
// 2. assemble the WIT: `wit/keel-js.wit` (world `keel:js-sdk/tool`: Keel's `tool` world plus
//    wasi:filesystem), `wit/deps/*`, and Keel's package;
// 3. componentize the bundle with componentize-js (no AOT: it downloads). `fetch` (wasi:http) is
//    left out unless package.json has `"keel": {"http": true}`, so such a component cannot reach
//    the network at all.

import { copyFile, mkdir, mkdtemp, readFile, readdir, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

import { componentize } from '@bytecodealliance/componentize-js';
import { rolldown } from 'rolldown';

const WORLD = 'keel:js-sdk/tool';
const here = dirname(fileURLToPath(import.meta.url));

const args = process.argv.slice(2);
const witFlag = args.indexOf('--plugin-wit');
const pluginWit = witFlag >= 0 ? args.splice(witFlag, 2)[1] : join(here, '../../wit/plugin.wit');
const [project, out] = args;
if (!project || !out) {
  console.error('usage: node build.mjs PROJECT_DIR OUT.wasm [--plugin-wit FILE]');
  process.exit(2);
}

const work = await mkdtemp(join(tmpdir(), 'keel-js-'));
try {
  const pkg = JSON.parse(await readFile(join(project, 'package.json'), 'utf8'));
  const entry = resolve(project, pkg.main ?? 'index.js');

  const bundle = await rolldown({
    input: entry,
    resolve: { alias: { '@keel/sdk': join(here, 'keel.js') } },
    external: [/^[a-z][a-z0-9-]*:[a-z]/],
    logLevel: 'warn',
    onLog(level, log) {
      console.error(`${level}: ${log.message}`);
    },
  });
  const { output } = await bundle.generate({ format: 'esm' });
  await bundle.close();
  const source = join(work, 'tool.js');
  await writeFile(source, output[0].code);

  const wit = join(work, 'wit');
  await mkdir(join(wit, 'deps'), { recursive: true });
  await copyFile(join(here, 'wit/keel-js.wit'), join(wit, 'keel-js.wit'));
  for (const name of await readdir(join(here, 'wit/deps'))) {
    await copyFile(join(here, 'wit/deps', name), join(wit, 'deps', name));
  }
  await copyFile(pluginWit, join(wit, 'deps', 'keel-plugin.wit'));

  const { component } = await componentize({
    sourcePath: source,
    witPath: wit,
    worldName: WORLD,
    disableFeatures: pkg.keel?.http === true ? [] : ['http', 'fetch-event'],
  });
  await writeFile(out, component);
} catch (e) {
  console.error(e?.message ?? String(e));
  process.exitCode = 1;
} finally {
  await rm(work, { recursive: true, force: true });
}
