"""componentize-py entry module for a Keel Python project whose tools live in `app.py`.

componentize-py imports this module while pre-initialising the component (at build time) and
looks up the class implementing the exported `tools` interface by name (`Tools`). Importing `app`
declares the tools; `keel._export` checks them and serves them. A project with another entry
module uses keel-build (`keel.toml`: `[python] module = "..."`), which writes its own entry.
"""

import app  # noqa: F401  (declares the tools)
from keel._export import Tools  # noqa: F401  (the export componentize-py looks for)
