"""Request bodies of the OpenAI-compatible endpoints, and the errors they answer with.

Requests are parsed strictly: a field of the wrong type, an unknown field or a value out of range
is a 400 in OpenAI's error shape that names the field (`param`), never a 422 or a 500.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError


class APIError(Exception):
    """An answer in OpenAI's error shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (
            status,
            " ".join(message.split()),
            type,
            param,
            code,
        )
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class Message(_Strict):
    role: Annotated[str, Field(min_length=1, max_length=64)]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(_Strict):
    include_usage: bool = False


NonNegInt = Annotated[int, Field(ge=0)]
Stop = str | Annotated[list[Annotated[str, Field(min_length=1)]], Field(max_length=4)] | None


class _Sampling(_Strict):
    model: str | None = None
    max_tokens: NonNegInt | None = None
    temperature: Annotated[float, Field(ge=0)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    top_k: NonNegInt | None = None  # llama-server's extension; 0 = all tokens
    seed: Annotated[int, Field(ge=0, lt=2**64)] | None = None
    stop: Stop = None
    n: Annotated[int, Field(ge=1, le=1)] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # accepted at their neutral values only (anything else is a 400 that says it is unsupported)
    frequency_penalty: Annotated[float, Field(ge=0, le=0)] | None = None
    presence_penalty: Annotated[float, Field(ge=0, le=0)] | None = None
    logprobs: Literal[False] | None = None

    def stops(self) -> list[str]:
        if self.stop is None:
            return []
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop)
        if any(not s for s in stops):
            raise APIError(400, "stop sequences must not be empty", param="stop")
        return stops


class ChatRequest(_Sampling):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_completion_tokens: NonNegInt | None = None

    def limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(_Sampling):
    prompt: str | Annotated[list[str], Field(min_length=1, max_length=1)]
    echo: Literal[False] = False

    def text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]

    def limit(self) -> int | None:
        return self.max_tokens


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not valid JSON")


def parse_body(raw: bytes, model: type[BaseModel]) -> Any:
    """Bytes → a validated request, or an APIError(400) that names the field at fault."""
    try:
        data = json.loads(raw, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError) as exc:
        raise APIError(400, f"the request body is not valid JSON ({exc})", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(data).__name__}", code="invalid_json")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise _from_validation(exc) from None


_NEUTRAL_ONLY = {"frequency_penalty": "0", "presence_penalty": "0", "logprobs": "false", "n": "1", "echo": "false"}


def _from_validation(exc: ValidationError) -> APIError:
    errors = exc.errors(include_url=False)
    # a union reports every member's complaint: the one that is not a plain type mismatch is the one
    # about the input's own type (a list too long, a part with a bad 'type')
    err = next((e for e in errors if not e["type"].endswith("_type")), errors[0])
    loc = [str(p) for p in err["loc"] if not isinstance(p, str) or not p[:1].isupper() and "[" not in p]
    # pydantic adds union-member names (`list[...]`, `str`) to the location; keep the field path
    param = ".".join(p for p in loc if p not in ("str", "int", "float", "bool", "list", "function-after"))
    top = param.split(".", 1)[0] if param else None
    kind = err["type"]
    if kind == "extra_forbidden":
        return APIError(400, f"unrecognized request argument supplied: {param}", param=param, code="unknown_parameter")
    if kind == "missing":
        return APIError(400, f"missing required parameter: '{param}'", param=param, code="missing_required_parameter")
    if top in _NEUTRAL_ONLY and param == top:
        return APIError(
            400,
            f"'{top}' is not supported by this server (only {_NEUTRAL_ONLY[top]})",
            param=top,
            code="unsupported_parameter",
        )
    got = err.get("input")
    got_text = (
        f"{type(got).__name__} {json.dumps(got)[:40]}"
        if isinstance(got, (int, float, str, bool)) or got is None
        else type(got).__name__
    )
    return APIError(
        400,
        f"invalid value for '{param}': {err['msg'].lower()} (got {got_text})",
        param=param or None,
        code="invalid_value",
    )
