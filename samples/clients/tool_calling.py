"""Tool calling (server started with --enable-auto-tool-choice --tool-call-parser hermes and a
model whose template renders tools, e.g. Qwen2.5-Instruct): the model asks for a function, we run
it, send the result back, and print the final answer.

    python samples/clients/tool_calling.py --city Paris
"""

import argparse
import json

from openai import OpenAI

TOOLS = [{
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                        "unit": {"type": "string", "enum": ["C", "F"]}},
                       "required": ["city"]},
    },
}]


def get_weather(city: str, unit: str = "C") -> str:
    return json.dumps({"city": city, "temperature": 21 if unit == "C" else 70, "unit": unit, "sky": "clear"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--base-url", default="http://localhost:8000/v1")
    parser.add_argument("--api-key", default="EMPTY")
    parser.add_argument("--model", default=None)
    parser.add_argument("--city", default="Paris")
    args = parser.parse_args()
    client = OpenAI(base_url=args.base_url, api_key=args.api_key)
    model = args.model or client.models.list().data[0].id
    messages = [{"role": "user", "content": f"What is the weather in {args.city}?"}]
    first = client.chat.completions.create(model=model, messages=messages, tools=TOOLS, tool_choice="auto",
                                           temperature=0, max_tokens=128)
    message = first.choices[0].message
    print(f"[finish_reason] {first.choices[0].finish_reason}")
    if not message.tool_calls:
        print(f"[no tool call] {message.content}")
        return
    messages.append(message.model_dump(exclude_none=True))
    for call in message.tool_calls:
        result = get_weather(**json.loads(call.function.arguments))
        print(f"[tool call] {call.function.name}({call.function.arguments}) -> {result}")
        messages.append({"role": "tool", "tool_call_id": call.id, "content": result})
    final = client.chat.completions.create(model=model, messages=messages, tools=TOOLS, temperature=0, max_tokens=128)
    print(final.choices[0].message.content)


if __name__ == "__main__":
    main()
