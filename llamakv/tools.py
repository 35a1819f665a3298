"""Tool calls for the chat endpoint.

Three formats, chosen by the model's chat template:
- "hermes", for templates that write calls in <tool_call></tool_call> tags (Qwen 2.5 and 3,
  Hermes and the models trained on them): the tools, earlier calls and tool results are rendered
  by the template itself; with `tool_choice` "required" or a named function the answer is
  constrained by a grammar to such tags around {"name", "arguments"} objects, with "auto" it is
  free and its tags are parsed.
- "llama3", for Llama 3.1-3.3's templates (they ask for {"name", "parameters"} JSON and send
  results as "ipython"): rendered by the template; a required or named call is constrained to
  that JSON object, one call at a time (the template writes no more); "auto" is parsed.
- "generic", llama-server's format for every other template: the tools are described in a system
  message and the answer is constrained to a JSON object, {"tool_call": {"name", "arguments"}}
  (or {"tool_calls": [...]} with parallel calls), or {"response": "..."} where "auto" allows a
  text answer. Earlier calls and tool results are written back in that format.
Constrained arguments follow each tool's JSON schema, so such a call is valid whatever the model.
Other native formats (Mistral's [TOOL_CALLS], Command-R's, DeepSeek's, ...) are not recognised:
those templates get the generic one.
"""
from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

_HERMES_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


def style_of(template: str | None) -> str:
    """The tool-call format of a chat template: "hermes", "llama3" or "generic"."""
    if not template or "tools" not in template:
        return "generic"
    # JSON {"name", "arguments"} inside the tags (not the XML or key/value formats some templates
    # write in the same tags)
    if "<tool_call>" in template and ("<args-json-object>" in template or "<args-dict>" in template) \
            and "<tool_calls>[" not in template:
        return "hermes"
    if "ipython" in template and '"parameters"' in template:
        return "llama3"
    return "generic"


class ToolError(ValueError):
    """A request's tools or tool messages are malformed (answered with 400)."""


@dataclass
class ToolPlan:
    tools: list[dict]          # {"name", "description", "parameters"} of each function
    choice: str                # "auto", "required" or the name of the one function to call
    parallel: bool = False
    style: str = "generic"     # see the module docstring

    @classmethod
    def from_request(cls, tools, tool_choice, parallel, style: str = "generic") -> "ToolPlan | None":
        """The request's tools, checked; None where there are none or tool_choice is "none"."""
        if tools is None or tools == []:
            return None
        if not isinstance(tools, list):
            raise ToolError("tools must be a list of {\"type\": \"function\", \"function\": {...}}")
        funcs = []
        for i, t in enumerate(tools):
            f = t.get("function") if isinstance(t, dict) and t.get("type", "function") == "function" else None
            if not isinstance(f, dict) or not isinstance(f.get("name"), str) or not f["name"]:
                raise ToolError(f"tools[{i}] must be {{\"type\": \"function\", \"function\": {{\"name\": ...}}}}")
            params = f.get("parameters", {"type": "object", "properties": {}})
            if not isinstance(params, dict):
                raise ToolError(f"tools[{i}].function.parameters must be a JSON schema object")
            funcs.append({"name": f["name"], "description": str(f.get("description", "")), "parameters": params})
        names = [f["name"] for f in funcs]
        if len(set(names)) != len(names):
            raise ToolError("tool names must be distinct")
        choice = "auto" if tool_choice is None else tool_choice
        if isinstance(choice, dict):
            name = (choice.get("function") or {}).get("name") if choice.get("type") == "function" else None
            if name not in names:
                raise ToolError(f"tool_choice names no tool of the request ({name!r})")
            choice = name
        elif choice == "none":
            return None
        elif choice not in ("auto", "required"):
            raise ToolError("tool_choice must be \"none\", \"auto\", \"required\" or {\"type\": \"function\", ...}")
        if parallel is not None and not isinstance(parallel, bool):
            raise ToolError("parallel_tool_calls must be true or false")
        return cls(funcs, choice, bool(parallel) and style != "llama3", style)

    def openai_tools(self) -> list[dict]:
        return [{"type": "function", "function": f} for f in self.tools]

    # -- the prompt --------------------------------------------------------------------------
    def system_message(self) -> str:
        listed = json.dumps([{"name": f["name"], "description": f["description"], "parameters": f["parameters"]}
                             for f in self.tools], indent=1)
        call = '{"tool_call": {"name": <tool name>, "arguments": <the arguments, as its parameters say>}}'
        if self.parallel:
            call = '{"tool_calls": [{"name": ..., "arguments": ...}, ...]}'
        if self.choice == "auto":
            how = f"To call a tool, answer with {call}. To answer directly, answer with {{\"response\": <your answer>}}."
        elif self.choice == "required":
            how = f"Answer with {call}."
        else:
            how = f"Answer with {call}, calling {self.choice}."
        return f"You can use these tools:\n{listed}\n{how} Answer with that JSON object only."

    def messages(self, messages: list[dict]) -> list[dict]:
        """The conversation with the tools described first (in the system message, if any) and
        earlier calls and results written in the answer format."""
        if self.style != "generic":
            return messages  # the template renders the tools (Context.chat_prompt(tools=...))
        out, intro = [], self.system_message()
        for m in messages:
            if m["role"] == "system" and not out:
                out.append({"role": "system", "content": (m["content"] + "\n\n" + intro).strip()})
                intro = None
                continue
            out.append(m)
        if intro is not None:
            out.insert(0, {"role": "system", "content": intro})
        return out

    # -- the answer ----------------------------------------------------------------------------
    def grammar(self, to_gbnf) -> str:
        """GBNF of the answer ("" where it is free); `to_gbnf(schema)` converts a JSON schema."""
        if self.style == "generic":
            return to_gbnf(self.schema())
        if self.choice == "auto":
            return ""
        if self.style == "llama3":
            calls = self._calls("parameters")
            return to_gbnf(calls[0] if len(calls) == 1 else {"anyOf": calls})
        calls = self._calls()
        call = to_gbnf(calls[0] if len(calls) == 1 else {"anyOf": calls})
        call = re.sub(r"^root ::=", "call ::=", call, count=1, flags=re.MULTILINE)
        tagged = '"<tool_call>\\n" call "\\n</tool_call>"'
        root = f"root ::= {tagged} (\"\\n\" {tagged})*" if self.parallel else f"root ::= {tagged}"
        return call + "\n" + root + "\n"

    def _calls(self, key: str = "arguments") -> list[dict]:
        return [{"type": "object", "properties": {"name": {"const": f["name"]}, key: f["parameters"]},
                 "required": ["name", key]} for f in self.tools
                if self.choice in ("auto", "required") or f["name"] == self.choice]

    def schema(self) -> dict:
        calls = self._calls()
        call = calls[0] if len(calls) == 1 else {"anyOf": calls}
        if self.parallel:
            wrapped = {"type": "object", "properties": {"tool_calls": {"type": "array", "items": call, "minItems": 1}},
                       "required": ["tool_calls"]}
        else:
            wrapped = {"type": "object", "properties": {"tool_call": call}, "required": ["tool_call"]}
        if self.choice != "auto":
            return wrapped
        text = {"type": "object", "properties": {"response": {"type": "string"}}, "required": ["response"]}
        return {"anyOf": [wrapped, text]}

    def parse(self, text: str) -> tuple[str | None, list[dict]]:
        """(text answer, tool calls in OpenAI's shape) of a model's answer; an answer that is not
        what was asked for (cut by the token limit, say) comes back as text."""
        if self.style == "llama3":
            try:
                obj = json.loads(text.strip().removeprefix("<|python_tag|>"))
            except json.JSONDecodeError:
                return text, []
            if isinstance(obj, dict) and isinstance(obj.get("name"), str) and ("parameters" in obj or "arguments" in obj):
                return None, [_openai_call({"name": obj["name"], "arguments": obj.get("parameters", obj.get("arguments"))})]
            return text, []
        if self.style == "hermes":
            calls = []
            for block in _HERMES_CALL.findall(text):
                try:
                    obj = json.loads(block)
                except json.JSONDecodeError:
                    return text, []
                calls.append(obj)
            if not calls:
                return text, []
            rest = _HERMES_CALL.sub("", text).strip()
            return rest or None, [_openai_call(c) for c in calls if isinstance(c, dict)]
        try:
            obj = json.loads(text)
        except json.JSONDecodeError:
            return text, []
        if not isinstance(obj, dict):
            return text, []
        calls = obj.get("tool_calls") if "tool_calls" in obj else ([obj["tool_call"]] if "tool_call" in obj else None)
        if calls is None:
            resp = obj.get("response")
            return (resp if isinstance(resp, str) else text), []
        return None, [_openai_call(c) for c in calls if isinstance(c, dict) and isinstance(c.get("name"), str)]


def _openai_call(c: dict) -> dict:
    return {"id": "call_" + uuid.uuid4().hex[:24], "type": "function",
            "function": {"name": str(c.get("name", "")), "arguments": json.dumps(c.get("arguments", {}))}}


def history_message(msg: dict, index: int, style: str = "generic") -> dict:
    """A chat message of the request as the template gets it. Generic: an assistant's earlier
    tool calls as the JSON it answered, a tool's result as a user message naming the call.
    Hermes: as they are, the calls' arguments as objects (the template writes them as JSON)."""
    role = msg["role"]
    if role == "assistant" and msg.get("tool_calls"):
        calls = msg["tool_calls"]
        if not isinstance(calls, list):
            raise ToolError(f"messages[{index}].tool_calls must be a list")
        parsed = []
        for c in calls:
            f = c.get("function") if isinstance(c, dict) else None
            if not isinstance(f, dict) or not isinstance(f.get("name"), str):
                raise ToolError(f"messages[{index}].tool_calls: each needs function.name and function.arguments")
            args = f.get("arguments", "{}")
            try:
                args = json.loads(args) if isinstance(args, str) else args
            except json.JSONDecodeError as e:
                raise ToolError(f"messages[{index}].tool_calls: arguments are not JSON: {e}") from e
            parsed.append({"name": f["name"], "arguments": args})
        if style in ("hermes", "llama3"):
            return {"role": "assistant", "content": msg.get("content") or "",
                    "tool_calls": [{"type": "function", "function": c} for c in parsed]}
        body = {"tool_call": parsed[0]} if len(parsed) == 1 else {"tool_calls": parsed}
        return {"role": "assistant", "content": json.dumps(body)}
    if role == "tool" and style in ("hermes", "llama3"):
        return {"role": "tool", "content": msg.get("content") or "", "tool_call_id": msg.get("tool_call_id")}
    if role == "tool":
        who = msg.get("name") or msg.get("tool_call_id") or "a tool"
        return {"role": "user", "content": f"Result of {who}: {msg.get('content') or ''}"}
    return {"role": role, "content": msg.get("content") or ""}
