// {{name}}: a Keel tool plugin in JavaScript. `keel build` bundles this file with the SDK
// (`@keel/sdk`, resolved by the build: no `npm install` here) and makes a component.
import { InvalidInput, Plugin, schema } from '@keel/sdk';

const plugin = new Plugin({ name: '{{name}}', version: '0.1.0', description: '{{name}}: greets people.' });

plugin.tool(
  {
    name: 'greet',
    description: 'Greet someone by name.',
    input: schema.object({ name: schema.string('Who to greet.') }),
    output: schema.object({ greeting: schema.string() }),
    idempotent: true,
  },
  ({ name }) => {
    const who = name.trim();
    if (who === '') throw new InvalidInput('`name` must not be empty');
    return { greeting: `Hello, ${who}!` };
  },
);

export const tools = plugin.exports();
