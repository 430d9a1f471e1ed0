"""{{name}}: a Keel tool plugin in Python.

Each tool is a type-annotated function: the hints become its JSON Schema, the docstring its
description. `keel build` bundles CPython, this file and the SDK into one component.
"""

import keel

keel.plugin("{{name}}", "0.1.0", "{{name}}: greets people.")


@keel.tool(idempotent=True)
def greet(name: str) -> dict[str, str]:
    """Greet someone by name.

    Args:
        name: Who to greet.
    """
    name = name.strip()
    if not name:
        raise keel.InvalidInput("`name` must not be empty")
    return {"greeting": f"Hello, {name}!"}
