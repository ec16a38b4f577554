"""The encounter pages' forms: the editable fields, a transition, a "state at" question."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from django import forms
from django.core.exceptions import ObjectDoesNotExist
from django.core.exceptions import ValidationError as DjangoValidationError
from django.utils import timezone

from ..models import (
    Encounter,
)

# ---------------------------------------------------------------------------------------------
# Encounters: forms
# ---------------------------------------------------------------------------------------------


class EncounterForm(forms.ModelForm):
    """The encounter's editable fields; the subject must exist."""

    class Meta:
        model = Encounter
        fields = "__all__"
        help_texts = {
            "definition": "Can change only while no transition is recorded; the encounter then "
            "starts over in that definition's initial state.",
            "subject_id": "The primary key of the subject (an object of the content type).",
        }

    def clean(self) -> dict[str, Any]:
        super().clean()
        cleaned = self.cleaned_data
        content_type = cleaned.get("subject_content_type")
        subject_id = cleaned.get("subject_id")
        if content_type is not None and subject_id not in (None, ""):
            model = content_type.model_class()
            subject = None
            if model is not None:
                try:
                    subject = model._default_manager.get(pk=subject_id)
                except (ObjectDoesNotExist, ValueError, DjangoValidationError):
                    subject = None
            if subject is None:
                self.add_error(
                    "subject_id", f"There is no {content_type.name} with id {subject_id!r}."
                )
            cleaned["subject"] = subject
        return cleaned


class TransitionForm(forms.Form):
    """What a person adds to a transition: why, when (for a backdated entry) and the context
    the validators read. The target state and the version the page showed are carried along."""

    to_state = forms.CharField(widget=forms.HiddenInput)
    expected_version = forms.IntegerField(min_value=0, widget=forms.HiddenInput)
    reason = forms.CharField(required=False, widget=forms.Textarea(attrs={"rows": 3, "cols": 60}))
    effective_at = forms.DateTimeField(
        required=False,
        help_text="Leave empty for now. A time before the timeline's last row records a "
        "backdated entry. YYYY-MM-DD HH:MM:SS in the admin's time zone, or ISO 8601 with an "
        "offset.",
    )
    context = forms.CharField(
        required=False,
        widget=forms.Textarea(attrs={"rows": 3, "cols": 60, "style": "font-family: monospace"}),
        help_text='A JSON object passed to the validators, e.g. {"consent": true}.',
    )

    def __init__(self, *args: Any, needs_context: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fields["effective_at"].label = f"Effective at ({timezone.get_current_timezone_name()})"
        if not needs_context:
            del self.fields["context"]

    def clean_effective_at(self) -> datetime | None:
        value = self.cleaned_data.get("effective_at")
        if value is not None and timezone.is_naive(value):  # USE_TZ off: not supported
            raise forms.ValidationError("Give a time with a time zone.")
        return value

    def clean_context(self) -> dict | None:
        text = self.cleaned_data.get("context", "").strip()
        if not text:
            return None
        try:
            value = json.loads(text)
        except ValueError as exc:
            raise forms.ValidationError(f"Context is not valid JSON: {exc}") from exc
        if not isinstance(value, dict):
            raise forms.ValidationError(
                f"Context must be a JSON object ({{...}}), not {type(value).__name__}."
            )
        return value


class StateAtForm(forms.Form):
    """The "state at …" box of the encounter page (a GET form)."""

    state_at = forms.DateTimeField(label="State at")
    known_at = forms.DateTimeField(label="as known at", required=False)
