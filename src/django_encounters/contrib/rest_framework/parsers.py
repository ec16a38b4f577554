"""The request parsers of the REST API: Django REST framework's, with the limits Django applies
to form data applied to JSON too.

DRF's ``JSONParser`` reads the whole body whatever its size and lets a ``RecursionError`` out
of ``json.load`` (a body nested a few thousand levels deep): a 500. :class:`BoundedJSONParser`
refuses a body larger than ``DATA_UPLOAD_MAX_MEMORY_SIZE`` with Django's own
``RequestDataTooBig`` (a ``413`` Problem, read no further than the limit) and a body nested too
deep for the parser as a ``ParseError`` (a ``400`` Problem). The nesting the store accepts is
narrower (``ENCOUNTERS_MAX_CONTEXT_DEPTH``), checked by the services.
"""

from __future__ import annotations

from typing import IO, Any

from django.conf import settings
from django.core.exceptions import RequestDataTooBig
from rest_framework.exceptions import ParseError
from rest_framework.parsers import FormParser, JSONParser, MultiPartParser
from rest_framework.utils import json


def too_big(limit: int) -> RequestDataTooBig:
    return RequestDataTooBig(
        f"The request body exceeds DATA_UPLOAD_MAX_MEMORY_SIZE ({limit} bytes)."
    )


class BoundedJSONParser(JSONParser):
    """``application/json`` at most ``DATA_UPLOAD_MAX_MEMORY_SIZE`` bytes (None: no limit),
    parse errors and too-deep nesting as ``ParseError``."""

    def parse(
        self, stream: IO[bytes] | None, media_type: str | None = None, parser_context: Any = None
    ) -> Any:
        parser_context = parser_context or {}
        limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
        request = parser_context.get("request")
        if limit is not None and request is not None:
            try:
                declared = int(request.META.get("CONTENT_LENGTH") or 0)
            except ValueError:
                declared = 0
            if declared > limit:  # refused before a byte of it is read
                raise too_big(limit)
        if stream is None:
            raise ParseError("JSON parse error - the request has no body")
        raw = stream.read() if limit is None else stream.read(limit + 1)
        if limit is not None and len(raw) > limit:
            raise too_big(limit)
        # As DRF's parsers read it (its get_encoding() helper exists only from 3.16 on).
        charset = (parser_context or {}).get("encoding") or settings.DEFAULT_CHARSET
        try:
            text = raw.decode(charset)
        except (LookupError, UnicodeDecodeError) as exc:
            raise ParseError(f"JSON parse error - the body is not {charset} text: {exc}") from exc
        parse_constant = json.strict_constant if self.strict else None
        try:
            return json.loads(text, parse_constant=parse_constant)
        except RecursionError:
            raise ParseError(
                "JSON parse error - the body is nested too deeply to be parsed"
            ) from None
        except ValueError as exc:
            raise ParseError(f"JSON parse error - {exc}") from exc


#: What the API's views parse: JSON (bounded), and forms (bounded by Django itself).
PARSER_CLASSES = [BoundedJSONParser, FormParser, MultiPartParser]
