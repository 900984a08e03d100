"""LLaMA-Factory's tool formats (its tool_utils.py): how a template writes the tools it may call into the system
prompt, and how a reply that calls them is written. Each template names its format (``tool_format`` in
presets/templates.yaml); ``default`` is LLaMA-Factory's ReAct-style "Action: / Action Input:" text.
"""

from __future__ import annotations

import json

from engine.errors import UserError

_DEFAULT_TOOL_PROMPT = (
    "You have access to the following tools:\n{tool_text}"
    "Use the following format if using a tool:\n"
    "```\n"
    "Action: tool name (one of [{tool_names}])\n"
    "Action Input: the input to the tool, in a JSON format representing the kwargs "
    """(e.g. ```{{"input": "hello world", "num_beams": 5}}```)\n"""
    "```\n"
)
_GLM4_TOOL_PROMPT = (
    "你是一个名为 ChatGLM 的人工智能助手。你是基于智谱 AI 公司训练的语言模型 GLM-4 模型开发的，"
    "你的任务是针对用户的问题和要求提供适当的答复和支持。\n\n# 可用工具{tool_text}"
)
_LLAMA3_TOOL_PROMPT = (
    "Cutting Knowledge Date: December 2023\nToday Date: {date}\n\n"
    "You have access to the following functions. To call a function, please respond with JSON for a function call. "
    """Respond in the format {{"name": function name, "parameters": dictionary of argument name and its value}}. """
    "Do not use variables.\n\n{tool_text}"
)
_QWEN_TOOL_PROMPT = (
    "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>{tool_text}"
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
    """<tool_call></tool_call> XML tags:\n<tool_call>\n{{"name": <function-name>, """
    """"arguments": <args-json-object>}}\n</tool_call>"""
)


def parse_tools(tools: str | list | None) -> list[dict]:
    if not tools:
        return []
    if isinstance(tools, list):
        return tools
    try:
        parsed = json.loads(tools)
    except json.JSONDecodeError:
        parsed = None
    if not isinstance(parsed, list):
        raise UserError("the conversation's tools are not a JSON list of function schemas",
                        hint='give tools as a JSON string such as \'[{"name": ..., "parameters": {...}}]\'')
    return parsed


def tool_calls(message: dict, where: str = "an assistant message") -> list[tuple[str, str]]:
    """(name, arguments as compact JSON) per call, as LLaMA-Factory's FunctionCall holds them."""
    calls = []
    for call in message["tool_calls"]:
        function = call.get("function", call) if isinstance(call, dict) else None
        name = function.get("name") if isinstance(function, dict) else None
        arguments = function.get("arguments") if isinstance(function, dict) else None
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                arguments = None
        if not isinstance(name, str) or not isinstance(arguments, dict):
            raise UserError(f"{where} has a tool call without a function name and JSON object arguments",
                            hint='a tool call is {"type": "function", "function": {"name": ..., "arguments": "{...}"}}')
        calls.append((name, json.dumps(arguments, ensure_ascii=False)))
    return calls


def _function_schema(tool: dict) -> dict:
    return tool.get("function", "") if tool.get("type") == "function" else tool


def _wrapped(tool: dict) -> dict:
    return tool if tool.get("type") == "function" else {"type": "function", "function": tool}


def _default_tools(tools: list[dict]) -> str:
    tool_text, names = "", []
    for tool in map(_function_schema, tools):
        params = ""
        for name, param in tool["parameters"]["properties"].items():
            required = ", required" if name in tool["parameters"].get("required", []) else ""
            enum = ", should be one of [{}]".format(", ".join(param["enum"])) if param.get("enum") else ""
            items = f", where each item should be {param['items'].get('type', '')}" if param.get("items") else ""
            params += f"  - {name} ({param.get('type', '')}{required}): {param.get('description', '')}{enum}{items}\n"
        description = tool.get("description", "")
        tool_text += f"> Tool Name: {tool['name']}\nTool Description: {description}\nTool Args:\n{params}\n"
        names.append(tool["name"])
    return _DEFAULT_TOOL_PROMPT.format(tool_text=tool_text, tool_names=", ".join(names))


def _default_calls(calls: list[tuple[str, str]]) -> str:
    return "\n".join(f"Action: {name}\nAction Input: {arguments}" for name, arguments in calls)


def _glm4_tools(tools: list[dict]) -> str:
    tool_text = ""
    for tool in map(_function_schema, tools):
        body = json.dumps(tool, indent=4, ensure_ascii=False)
        tool_text += f"\n\n## {tool['name']}\n\n{body}\n" + "在调用上述函数时，请使用 Json 格式表示调用的参数。"
    return _GLM4_TOOL_PROMPT.format(tool_text=tool_text)


def _glm4_calls(calls: list[tuple[str, str]]) -> str:
    if len(calls) > 1:
        raise UserError("GLM-4's tool format calls one function per reply; this reply calls several",
                        hint="split the calls into turns, or choose a template whose tool format allows parallel calls")
    return f"{calls[0][0]}\n{calls[0][1]}"


def _llama3_tools(tools: list[dict]) -> str:
    from datetime import datetime

    tool_text = "".join(json.dumps(_wrapped(tool), indent=4, ensure_ascii=False) + "\n\n" for tool in tools)
    return _LLAMA3_TOOL_PROMPT.format(date=datetime.now().strftime("%d %b %Y"), tool_text=tool_text)


def _llama3_calls(calls: list[tuple[str, str]]) -> str:
    objects = [{"name": name, "parameters": json.loads(arguments)} for name, arguments in calls]
    return json.dumps(objects[0] if len(objects) == 1 else objects, ensure_ascii=False)


def _mistral_tools(tools: list[dict]) -> str:
    schemas = json.dumps([_wrapped(tool) for tool in tools], ensure_ascii=False)
    return f"[AVAILABLE_TOOLS] {schemas}[/AVAILABLE_TOOLS]"


def _mistral_calls(calls: list[tuple[str, str]]) -> str:
    return json.dumps([{"name": name, "arguments": json.loads(arguments)} for name, arguments in calls],
                      ensure_ascii=False)


def _qwen_tools(tools: list[dict]) -> str:
    tool_text = "".join("\n" + json.dumps(_wrapped(tool), ensure_ascii=False) for tool in tools)
    return _QWEN_TOOL_PROMPT.format(tool_text=tool_text)


def _qwen_calls(calls: list[tuple[str, str]]) -> str:
    texts = [json.dumps({"name": n, "arguments": json.loads(arguments)}, ensure_ascii=False) for n, arguments in calls]
    return "\n".join(f"<tool_call>\n{text}\n</tool_call>" for text in texts)


TOOL_FORMATS = {
    "default": (_default_tools, _default_calls),
    "glm4": (_glm4_tools, _glm4_calls),
    "llama3": (_llama3_tools, _llama3_calls),
    "mistral": (_mistral_tools, _mistral_calls),
    "qwen": (_qwen_tools, _qwen_calls),
}


def tool_prompt(tool_format: str, tools: list[dict]) -> str:
    """The tools' description, appended to the system prompt; nothing when there are none."""
    return TOOL_FORMATS[tool_format][0](tools) if tools else ""


def function_text(tool_format: str, calls: list[tuple[str, str]]) -> str:
    return TOOL_FORMATS[tool_format][1](calls)
