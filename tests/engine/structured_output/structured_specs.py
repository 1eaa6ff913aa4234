"""The issue's catalogue of constraints: 20 JSON schemas, 10 regexes, 5 choice lists, 3 EBNF grammars.
Shared by the parity, validity and server tests of structured outputs."""

_ADDRESS = {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["city", "zip"]}

SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}}, "required": ["name", "age"]},
    {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]},
    {"type": "object", "properties": {"score": {"type": "integer", "minimum": 0, "maximum": 10}}, "required": ["score"]},
    {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}}, "required": ["color"]},
    {"type": "object", "properties": {"tags": {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 3}},
     "required": ["tags"]},
    {"type": "object", "properties": {"point": {"type": "object", "properties": {"x": {"type": "integer"}, "y": {"type": "integer"}},
                                                "required": ["x", "y"]}}, "required": ["point"]},
    {"type": "object", "properties": {"code": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{2}$"}}, "required": ["code"]},
    {"type": "object", "properties": {"value": {"anyOf": [{"type": "integer"}, {"type": "boolean"}]}}, "required": ["value"]},
    {"type": "object", "$defs": {"address": _ADDRESS}, "properties": {"home": {"$ref": "#/$defs/address"}}, "required": ["home"]},
    {"type": "array", "items": {"type": "integer", "minimum": -5, "maximum": 5}, "minItems": 2, "maxItems": 4},
    {"type": "object", "properties": {"id": {"type": "integer", "minimum": 1}, "label": {"type": "string", "maxLength": 6}},
     "required": ["id", "label"]},
    {"type": "object", "properties": {"level": {"type": "string", "enum": ["low", "mid", "high"]},
                                      "count": {"type": "integer", "minimum": 0, "maximum": 99}}, "required": ["level", "count"]},
    {"type": "object", "properties": {"price": {"type": "number"}}, "required": ["price"]},
    {"type": "object", "properties": {"items": {"type": "array", "items": {"type": "object", "properties": {"n": {"type": "integer"}},
                                                                             "required": ["n"]}, "maxItems": 2}},
     "required": ["items"]},
    {"type": "object", "properties": {"answer": {"const": "yes"}}, "required": ["answer"]},
    {"type": "object", "properties": {"kind": {"anyOf": [{"const": "cat"}, {"const": "dog"}]}, "legs": {"type": "integer", "minimum": 0,
                                                                                                     "maximum": 8}},
     "required": ["kind", "legs"]},
    {"type": "object", "properties": {"first": {"type": "string", "minLength": 1, "maxLength": 4}, "active": {"type": "boolean"},
                                      "rank": {"type": "integer", "minimum": 1, "maximum": 3}}, "required": ["first", "active", "rank"]},
    {"type": "object", "properties": {"matrix": {"type": "array", "items": {"type": "array", "items": {"type": "integer"},
                                                                           "maxItems": 2}, "maxItems": 2}},
     "required": ["matrix"]},
    {"type": "object", "$defs": {"node": {"type": "object", "properties": {"v": {"type": "integer"}}, "required": ["v"]}},
     "properties": {"left": {"$ref": "#/$defs/node"}, "right": {"$ref": "#/$defs/node"}}, "required": ["left", "right"]},
    {"type": "object", "properties": {"date": {"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"},
                                      "note": {"type": ["string", "null"]}}, "required": ["date", "note"]},
]

REGEXES = [
    r"[a-c]{3}-[0-9]{2}",
    r"(yes|no|maybe)",
    r"[0-9]{3}-[0-9]{4}",
    r"[A-Z][a-z]{1,5}",
    r"(true|false)",
    r"[0-9]+\.[0-9]{2}",
    r"#[0-9a-f]{6}",
    r"[a-z]+@[a-z]+\.(com|org)",
    r"(ab)+c?",
    r"[xyz]{2,4}[0-9]",
]

CHOICES = [
    ["yes", "no"],
    ["red", "green", "blue"],
    ["positive", "negative", "neutral"],
    ["cat", "dog", "a bird", "fish tank"],
    ["A", "B", "C", "D", "E"],
]

GRAMMARS = [
    'root ::= expr\nexpr ::= term (("+" | "-") term)*\nterm ::= [0-9]+',
    'root ::= "[" name ("," name)* "]"\nname ::= [a-z]+',
    'root ::= pair (";" pair)*\npair ::= key "=" value\nkey ::= [a-z]+\nvalue ::= [0-9]+ | "true" | "false"',
]


def all_constraints() -> list[tuple[str, object]]:
    """(StructuredOutputsParams field, value) for the 38 constraints."""
    return ([("json", s) for s in SCHEMAS] + [("regex", r) for r in REGEXES] + [("choice", c) for c in CHOICES]
            + [("grammar", g) for g in GRAMMARS])
