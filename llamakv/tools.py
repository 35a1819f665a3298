"""Tool calls for the chat endpoint, in one format for every model.

The tools are described to the model in a system message and its answer is constrained by a
grammar to a JSON object: {"tool_call": {"name", "arguments"}} (or {"tool_calls": [...]} when
parallel calls are allowed) to call a tool, {"response": "..."} to answer in text (only where
`tool_choice` is "auto"). The arguments follow each tool's JSON schema, so a call is valid
whatever the model. This is llama-server's generic tool format (used for templates without a
native one); templates' native formats (Hermes' <tool_call> tags, Llama 3's JSON, Mistral's
[TOOL_CALLS]) are not used. Earlier calls and tool results in the conversation are written back
in the same format.
"""
from __future__ import annotations

import json
import uuid
from dataclasses import dataclass


class ToolError(ValueError):
    """A request's tools or tool messages are malformed (answered with 400)."""


@dataclass
class ToolPlan:
    tools: list[dict]          # {"name", "description", "parameters"} of each function
    choice: str                # "auto", "required" or the name of the one function to call
    parallel: bool = False

    @classmethod
    def from_request(cls, tools, tool_choice, parallel) -> "ToolPlan | None":
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
        return cls(funcs, choice, bool(parallel))

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
    def schema(self) -> dict:
        calls = [{"type": "object", "properties": {"name": {"const": f["name"]}, "arguments": f["parameters"]},
                  "required": ["name", "arguments"]} for f in self.tools
                 if self.choice in ("auto", "required") or f["name"] == self.choice]
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

    @staticmethod
    def parse(text: str) -> tuple[str | None, list[dict]]:
        """(text answer, tool calls in OpenAI's shape) of a model's answer; an answer that is not
        the JSON object asked for (cut by the token limit) comes back as text."""
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
        out = []
        for c in calls:
            if isinstance(c, dict) and isinstance(c.get("name"), str):
                out.append({"id": "call_" + uuid.uuid4().hex[:24], "type": "function",
                            "function": {"name": c["name"], "arguments": json.dumps(c.get("arguments", {}))}})
        return None, out


def history_message(msg: dict, index: int) -> dict:
    """A chat message of the request as the template gets it: an assistant's earlier tool calls
    as the JSON it answered, a tool's result as a user message naming the call."""
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
        body = {"tool_call": parsed[0]} if len(parsed) == 1 else {"tool_calls": parsed}
        return {"role": "assistant", "content": json.dumps(body)}
    if role == "tool":
        who = msg.get("name") or msg.get("tool_call_id") or "a tool"
        return {"role": "user", "content": f"Result of {who}: {msg.get('content') or ''}"}
    return {"role": role, "content": msg.get("content") or ""}
