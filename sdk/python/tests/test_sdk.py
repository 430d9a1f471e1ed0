"""Unit tests of the Python SDK's pure-Python part (schemas, argument conversion, errors).

Run with a normal CPython, no componentize-py needed: `python3 -m unittest discover -s sdk/python/tests`
(host/build/tests/python_sdk.rs runs them under `cargo test`). The component side (`keel._export`)
is covered by the black-box tests that build real components (host/cli/tests/languages.rs).
"""

import enum
import json
import os
import sys
import unittest
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, Optional, TypedDict

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import keel  # noqa: E402
from keel import _schema  # noqa: E402
from keel._docstring import parse  # noqa: E402


class Color(enum.Enum):
    RED = "red"
    BLUE = "blue"


@dataclass
class Point:
    """A point.

    Attributes:
        x: Horizontal.
        y: Vertical.
    """

    x: int
    y: int = 0


class Options(TypedDict, total=False):
    depth: int
    tags: list[str]


class Required(TypedDict):
    name: str


def fresh_spec(fn, **kwargs):
    """Declare `fn` as a tool in an empty registry and return its spec."""
    keel.REGISTRY.tools.clear()
    keel.tool(**kwargs)(fn)
    return next(iter(keel.REGISTRY.tools.values()))


class SchemaTest(unittest.TestCase):
    def test_scalars_and_containers(self):
        self.assertEqual(_schema.schema_of(str), {"type": "string"})
        self.assertEqual(_schema.schema_of(int), {"type": "integer"})
        self.assertEqual(_schema.schema_of(float), {"type": "number"})
        self.assertEqual(_schema.schema_of(bool), {"type": "boolean"})
        self.assertEqual(_schema.schema_of(Any), {})
        self.assertEqual(_schema.schema_of(list[int]), {"type": "array", "items": {"type": "integer"}})
        self.assertEqual(
            _schema.schema_of(dict[str, float]), {"type": "object", "additionalProperties": {"type": "number"}}
        )
        self.assertEqual(
            _schema.schema_of(Optional[str]), {"anyOf": [{"type": "string"}, {"type": "null"}]}
        )
        self.assertEqual(_schema.schema_of(int | str), {"anyOf": [{"type": "integer"}, {"type": "string"}]})
        self.assertEqual(_schema.schema_of(Literal["a", "b"]), {"enum": ["a", "b"]})
        self.assertEqual(_schema.schema_of(Color), {"enum": ["red", "blue"]})
        self.assertEqual(
            _schema.schema_of(tuple[int, str]),
            {"type": "array", "prefixItems": [{"type": "integer"}, {"type": "string"}], "items": False, "minItems": 2},
        )
        self.assertEqual(
            _schema.schema_of(Annotated[int, "How many."]), {"type": "integer", "description": "How many."}
        )

    def test_dataclasses_and_typeddicts(self):
        self.assertEqual(
            _schema.schema_of(Point),
            {
                "type": "object",
                "description": "A point.",
                "properties": {
                    "x": {"type": "integer", "description": "Horizontal."},
                    "y": {"type": "integer", "description": "Vertical."},
                },
                "required": ["x"],
                "additionalProperties": False,
            },
        )
        schema = _schema.schema_of(Options)
        self.assertNotIn("required", schema)
        self.assertEqual(schema["properties"]["tags"], {"type": "array", "items": {"type": "string"}})
        self.assertEqual(_schema.schema_of(Required)["required"], ["name"])

    def test_unsupported_types_are_refused(self):
        for tp in (set[int], dict[int, str], bytes, object.__class__):
            with self.assertRaises(_schema.SchemaError, msg=repr(tp)):
                _schema.schema_of(tp)

    def test_conversion(self):
        self.assertEqual(_schema.from_json(Point, {"x": 1}), Point(1, 0))
        self.assertEqual(_schema.from_json(list[Point], [{"x": 1, "y": 2}]), [Point(1, 2)])
        self.assertIs(_schema.from_json(Color, "blue"), Color.BLUE)
        self.assertEqual(_schema.from_json(tuple[int, str], [1, "a"]), (1, "a"))
        self.assertEqual(_schema.from_json(float, 2), 2.0)
        self.assertEqual(_schema.from_json(Optional[int], None), None)
        self.assertEqual(_schema.from_json(Options, {"depth": 2}), {"depth": 2})
        bad = [
            (int, True, "expected an integer"),
            (int, 1.5, "expected an integer"),
            (bool, 1, "expected a boolean"),
            (str, 5, "expected a string"),
            (Point, {"y": 1}, "missing field `x`"),
            (Point, {"x": 1, "z": 1}, "unknown field `z`"),
            (Color, "green", "expected one of"),
            (list[int], [1, "2"], "$[1]: expected an integer"),
            (Literal["a"], "b", "expected one of"),
        ]
        for tp, value, message in bad:
            with self.assertRaises(_schema.ConversionError, msg=f"{tp} {value!r}") as caught:
                _schema.from_json(tp, value)
            self.assertIn(message, str(caught.exception))

    def test_output_conversion(self):
        self.assertEqual(_schema.to_json(Point(1, 2)), {"x": 1, "y": 2})
        self.assertEqual(_schema.to_json({"c": Color.RED, "t": (1, 2)}), {"c": "red", "t": [1, 2]})
        for value in (float("nan"), {1: "x"}, object()):
            with self.assertRaises(_schema.ConversionError):
                _schema.to_json(value)


class ToolTest(unittest.TestCase):
    def test_schema_description_and_declarations(self):
        def word_count(text: str, ctx: keel.Context, limit: int = 10) -> Point:
            """Count words.

            Args:
                text: The text.
                limit: At most this many.

            Returns:
                Something.
            """
            return Point(len(text.split()), limit)

        spec = fresh_spec(word_count, idempotent=True, reads="/data", writes=["/out"], connects="api.example.com", env="TOKEN")
        self.assertEqual(spec.name, "word-count")
        self.assertEqual(spec.description, "Count words.")
        self.assertEqual(
            spec.input_schema,
            {
                "$schema": "https://json-schema.org/draft/2020-12/schema",
                "type": "object",
                "properties": {
                    "text": {"type": "string", "description": "The text."},
                    "limit": {"type": "integer", "description": "At most this many.", "default": 10},
                },
                "required": ["text"],
                "additionalProperties": False,
            },
        )
        self.assertEqual(spec.output_schema["properties"]["x"]["type"], "integer")
        self.assertEqual(spec.context_param, "ctx")
        self.assertTrue(spec.idempotent)
        caps = spec.capabilities
        self.assertEqual((caps.reads, caps.writes, caps.connects, caps.env), (["/data"], ["/out"], ["api.example.com"], ["TOKEN"]))
        # The decorated function is unchanged.
        self.assertEqual(word_count("a b", keel.Context()), Point(2, 10))

    def test_invoke_checks_arguments_and_serialises_compactly(self):
        def echo(text: str, n: int = 1) -> dict[str, Any]:
            """Echo."""
            return {"text": text * n, "é": None}

        spec = fresh_spec(echo)
        ctx = keel.Context()
        self.assertEqual(spec.invoke(ctx, '{"text":"ab","n":2}'), '{"text":"abab","é":null}')
        for arguments, message in [
            ("{}", "missing field `text`"),
            ('{"text": 5}', "text: expected a string"),
            ('{"text": "a", "x": 1}', "unknown argument `x`"),
            ("[1]", "must be a JSON object"),
            ("{not json", "not JSON"),
        ]:
            with self.assertRaises(keel.InvalidInput, msg=arguments) as caught:
                spec.invoke(ctx, arguments)
            self.assertIn(message, caught.exception.message)

    def test_bad_declarations_fail_early(self):
        def untyped(x):
            """No annotation."""

        def weird(x: set[int]):
            """Unsupported type."""

        for fn, message in [(untyped, "needs a type annotation"), (weird, "no JSON Schema form")]:
            with self.assertRaises(TypeError) as caught:
                fresh_spec(fn)
            self.assertIn(message, str(caught.exception))
        with self.assertRaises(ValueError):
            fresh_spec(lambda: None, name="Bad Name")
        with self.assertRaises(ValueError):
            keel.plugin("Not Valid", "0.1.0", "x")

    def test_errors_carry_their_fields(self):
        denied = keel.Denied("filesystem", "/etc", "not granted")
        self.assertEqual((denied.capability, denied.target, denied.message), ("filesystem", "/etc", "not granted"))
        self.assertTrue(issubclass(keel.TimedOut, keel.ToolError))
        self.assertEqual(keel._failure_message(KeyError("k")), "KeyError: 'k'")
        self.assertEqual(keel._failure_message(SystemExit(3)), "the tool called sys.exit(3)")
        self.assertEqual(keel._failure_message(KeyboardInterrupt()), "KeyboardInterrupt")

    def test_output_that_is_not_unicode_is_a_failure(self):
        def listing() -> str:
            """A file name that is not UTF-8, as `os.listdir` gives it."""
            return "caf\udce9"

        with self.assertRaises(keel.Failed) as caught:
            fresh_spec(listing).invoke(keel.Context(), "{}")
        self.assertIn("not valid Unicode", caught.exception.message)


class DocstringTest(unittest.TestCase):
    def test_google_style(self):
        doc = parse(
            """Summary line.

            More text.

            Args:
                a (int): First,
                    continued.
                b: Second.

            Raises:
                ValueError: never.
            """
        )
        self.assertEqual(doc.summary, "Summary line.\n\nMore text.")
        self.assertEqual(doc.params, {"a": "First, continued.", "b": "Second."})


if __name__ == "__main__":
    unittest.main()
