"""The encounter pages' forms: the editable fields (refused when the encounter changed since the
page was rendered), a transition (with the fields its target state's validators need), a
"state at" question."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import date, datetime, time
from decimal import Decimal
from typing import Any
from uuid import UUID

from django import forms
from django.contrib.admin.widgets import RelatedFieldWidgetWrapper
from django.core.exceptions import ObjectDoesNotExist
from django.core.exceptions import ValidationError as DjangoValidationError
from django.db import models
from django.utils import timezone
from django.utils.dateparse import parse_datetime

from ..models import (
    Encounter,
    EncounterTransition,
)
from ..validators import get_validator_instance, parse_validator_entry
from .common import LabelledSplitDateTime, local_time

# ---------------------------------------------------------------------------------------------
# Encounters: the edit form, refused when the encounter changed since it was rendered
# ---------------------------------------------------------------------------------------------

#: The hidden inputs the edit form carries: the stream version it was rendered at and the
#: values of its editable fields then (JSON).
SEEN_VERSION = "_seen_version"
SEEN_FIELDS = "_seen_fields"


def canonical(value: Any) -> Any:
    """A field's value as JSON can hold it, to the microsecond: what two looks at a field
    compare."""
    if isinstance(value, models.Model):
        value = value.pk
    if isinstance(value, (datetime, date, time)):
        return value.isoformat()
    if isinstance(value, (UUID, Decimal)):
        return str(value)
    return value


def _python_value(field: forms.Field, value: Any) -> Any:
    """A value :func:`canonical` wrote, back as the form field compares it (datetimes parsed,
    without the microseconds a widget that cannot show them dropped)."""
    if isinstance(value, str) and isinstance(
        field, (forms.DateTimeField, forms.SplitDateTimeField)
    ):
        parsed = parse_datetime(value)
        if parsed is not None:
            value = parsed
    if isinstance(value, datetime) and not field.widget.supports_microseconds:
        value = value.replace(microsecond=0)
    return value


def widget_data(field: forms.Field, html_name: str, value: Any) -> dict[str, str]:
    """What a browser would post for ``value`` shown in ``field``'s widget (its sub-widgets'
    names for a split widget)."""
    widget = field.widget
    while isinstance(widget, RelatedFieldWidgetWrapper):
        widget = widget.widget
    prepared = field.prepare_value(value)
    if isinstance(widget, forms.MultiWidget):
        parts = prepared if isinstance(prepared, (list, tuple)) else widget.decompress(prepared)
        names = getattr(widget, "widgets_names", [f"_{i}" for i in range(len(widget.widgets))])
        return {
            html_name + suffix: _formatted(sub.format_value(part))
            for suffix, sub, part in zip(names, widget.widgets, parts or [], strict=False)
        }
    return {html_name: _formatted(widget.format_value(prepared))}


def _formatted(value: Any) -> str:
    if isinstance(value, list):  # a select's chosen values
        value = value[0] if value else ""
    return "" if value is None else str(value)


def model_field(name: str) -> models.Field:
    """The encounter's model field ``name`` (a concrete field, never a reverse relation)."""
    field = Encounter._meta.get_field(name)
    assert isinstance(field, models.Field)
    return field


def shown_value(encounter: Encounter, name: str, value: Any) -> str:
    """A field's value as a message names it."""
    if value in (None, ""):
        return "(empty)"
    if isinstance(value, datetime):
        return local_time(value)
    field = model_field(name)
    if field.is_relation and field.related_model is not None:
        related = field.related_model._default_manager.filter(pk=value).first()
        return str(related) if related is not None else f"#{value}"
    text = str(value)
    return repr(text if len(text) <= 60 else text[:57] + "...")


class EncounterForm(forms.ModelForm):
    """The encounter's editable fields; the subject must exist.

    On change, the form carries the stream version and the field values it was rendered with
    (:data:`SEEN_VERSION`, :data:`SEEN_FIELDS`), and its save is refused when the encounter
    moved on or a field changed since: the error says what changed, the typed values stay, the
    fields changed by someone else show their new values, and saving again writes what this
    person changed. Only the fields this person changed are written (an unchanged time keeps
    its microseconds)."""

    class Meta:
        model = Encounter
        fields = "__all__"
        help_texts = {
            "definition": "Can change only while no transition is recorded; the encounter then "
            "starts over in that definition's initial state.",
            "subject_id": "The primary key of the subject (an object of the content type).",
        }

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: What changed since the page was rendered (field name -> (seen, now)), when stale.
        self.changed_since: dict[str, tuple[Any, Any]] = {}

    # -- what the page was rendered with -----------------------------------------------------

    @property
    def is_change(self) -> bool:
        return not self.instance._state.adding

    def editable_names(self) -> list[str]:
        model_fields = {f.name for f in Encounter._meta.concrete_fields}
        return [name for name in self.fields if name in model_fields]

    def stored_values(self) -> dict[str, Any]:
        """The editable fields' values as stored now (as loaded with the form's instance)."""
        return {
            name: canonical(model_field(name).value_from_object(self.instance))
            for name in self.editable_names()
        }

    def seen_version(self) -> int:
        """The version to carry on the rendered page: the instance's."""
        return int(self.instance.version)

    def seen_fields(self) -> str:
        return json.dumps(self.stored_values(), sort_keys=True)

    def _posted_seen(self) -> tuple[int | None, dict[str, Any] | None]:
        try:
            version = int(self.data[SEEN_VERSION])
        except (KeyError, TypeError, ValueError):
            version = None
        try:
            seen = json.loads(self.data[SEEN_FIELDS])
        except (KeyError, TypeError, ValueError):
            seen = None
        return version, seen if isinstance(seen, dict) else None

    # -- validation -------------------------------------------------------------------------

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
        if self.is_change:
            self._refuse_if_changed_since()
        return cleaned

    def _refuse_if_changed_since(self) -> None:
        """A form error (nothing is written) when the encounter moved on or one of its fields
        changed since the page was rendered; the form then shows the encounter as it is now,
        with this person's own changes kept."""
        version, seen = self._posted_seen()
        if version is None or seen is None:
            self.add_error(
                None,
                "Not saved: this form did not say which version of the encounter it was "
                "rendered from. Reload the page and make your change again.",
            )
            return
        now = self.stored_values()
        theirs = [name for name in now if name in seen and seen[name] != now[name]]
        moved = version != self.instance.version
        if not moved and not theirs:
            return
        mine = []
        for name in self.editable_names():
            field = self.fields[name]
            if name in seen and field.has_changed(
                _python_value(field, seen[name]), self[name].data
            ):
                mine.append(name)
        lines = []
        if moved:
            rows = EncounterTransition.objects.filter(
                encounter_id=self.instance.pk, sequence__gt=version
            ).order_by("sequence")
            moves = "; ".join(
                f"#{row.sequence} {row.from_state} → {row.to_state}"
                + (f" by {row.transitioned_by_name}" if row.transitioned_by_name else "")
                for row in rows
            )
            lines.append(
                f"it moved on from version {version} to {self.instance.version} ({moves}); it "
                f"is now in '{self.instance.state}'"
            )
        data = self.data.copy()  # type: ignore[attr-defined]  # a QueryDict
        for name in theirs:
            label = self.fields[name].label or name
            seen_value = _python_value(self.fields[name], seen[name])
            stored = model_field(name).value_from_object(self.instance)
            self.changed_since[name] = (seen_value, stored)
            change = (
                f"{label} was changed from {shown_value(self.instance, name, seen_value)} to "
                f"{shown_value(self.instance, name, stored)}"
            )
            if name in mine:
                change += " — you changed it too: your value is kept in the form"
            else:
                data.update(widget_data(self.fields[name], self.add_prefix(name), stored))
            lines.append(change)
        data[SEEN_VERSION] = str(self.instance.version)
        data[SEEN_FIELDS] = self.seen_fields()
        self.data = data
        yours = ", ".join(str(self.fields[n].label or n) for n in mine) or "none"
        self.add_error(
            None,
            "Not saved, nothing was written: this encounter changed after you opened this "
            f"page — {'; '.join(lines)}. The form now shows it as it is, with your changes "
            f"({yours}) kept; check them and save again.",
        )

    def _post_clean(self) -> None:
        if self.is_change:
            # Only what this person changed is put on the instance (and written): an unchanged
            # time keeps the microseconds its widget could not show.
            changed = set(self.changed_data)
            for name in self.editable_names():
                if name not in changed:
                    self.cleaned_data.pop(name, None)
        super()._post_clean()  # type: ignore[misc]  # ModelForm's, not in the stubs

    def changed_model_fields(self) -> list[str]:
        return [name for name in self.changed_data if name in self.editable_names()]


# ---------------------------------------------------------------------------------------------
# Encounters: the transition form
# ---------------------------------------------------------------------------------------------


class EffectiveAtWidget(LabelledSplitDateTime):
    """The admin's date and time boxes, each named; a single ``effective_at`` value (ISO 8601,
    with an offset if wanted) is still read, for scripts and for anyone who pastes one."""

    def __init__(self, attrs: Any = None) -> None:
        super().__init__("Effective at", attrs)

    def value_from_datadict(self, data: Any, files: Any, name: str) -> Any:
        if name in data:
            return data.get(name)
        return super().value_from_datadict(data, files, name)

    def decompress(self, value: Any) -> Any:
        if isinstance(value, str):
            try:
                parsed = parse_datetime(value)
            except ValueError:  # well-formed, but no such day or time
                parsed = None
            if parsed is None:
                return [value, ""]
            value = parsed if timezone.is_aware(parsed) else timezone.make_aware(parsed)
        return super().decompress(value)


class EffectiveAtField(forms.SplitDateTimeField):
    widget = EffectiveAtWidget

    def clean(self, value: Any) -> Any:
        if isinstance(value, str):
            return forms.DateTimeField(required=False).clean(value)
        return super().clean(value)

    def has_changed(self, initial: Any, data: Any) -> bool:
        return bool(data) and data != ["", ""]


#: Prefix of the form fields that set an encounter field in the same step as the transition.
FIELD_PREFIX = "set_"


def required_fields(encounter: Encounter, to_state: str) -> list[str]:
    """The encounter fields the validators of its pinned definition version require before
    entering ``to_state`` (:meth:`StateValidator.required_fields`), in order, that a form can
    set: concrete, editable, not derived from the log. A validator that cannot be loaded
    requires nothing here (the transition reports it)."""
    names: list[str] = []
    editable = {
        f.name
        for f in Encounter._meta.concrete_fields
        if f.editable and f.name not in Encounter.LOG_DERIVED_FIELDS and not f.primary_key
    }
    for entry in encounter.machine.validators or []:
        try:
            validator = get_validator_instance(*parse_validator_entry(entry))
            wanted = validator.required_fields(to_state)
        except Exception:  # noqa: BLE001 - reported by transition() itself
            continue
        for name in wanted or []:
            if isinstance(name, str) and name in editable and name not in names:
                names.append(name)
    return names


class TransitionForm(forms.Form):
    """What a person adds to a transition: why, when (for a backdated entry), the context the
    validators read, and the encounter fields the target state's validators require (written
    with the transition, in the same step). The target state and the version the page showed
    are carried along."""

    to_state = forms.CharField(widget=forms.HiddenInput)
    expected_version = forms.IntegerField(min_value=0, widget=forms.HiddenInput)
    reason = forms.CharField(required=False, widget=forms.Textarea(attrs={"rows": 3, "cols": 60}))
    effective_at = EffectiveAtField(
        required=False,
        help_text="Leave empty for now. A time before the timeline's last row records a "
        "backdated entry. In the admin's time zone.",
    )
    context = forms.CharField(
        required=False,
        widget=forms.Textarea(attrs={"rows": 3, "cols": 60, "style": "font-family: monospace"}),
        help_text='A JSON object passed to the validators, e.g. {"consent": true}.',
    )

    def __init__(
        self,
        *args: Any,
        needs_context: bool = True,
        encounter: Encounter | None = None,
        fields: Sequence[str] = (),
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.fields["effective_at"].label = f"Effective at ({timezone.get_current_timezone_name()})"
        if not needs_context:
            del self.fields["context"]
        self.encounter = encounter
        #: The encounter fields set in the same step: model field name -> form field name.
        self.same_step: dict[str, str] = {}
        for name in fields:
            stored = model_field(name)
            if isinstance(stored, models.DateTimeField):
                field: forms.Field = forms.SplitDateTimeField(
                    widget=LabelledSplitDateTime(str(stored.verbose_name).capitalize()),
                    required=False,
                )
            else:
                field = stored.formfield(required=False) or forms.CharField(required=False)
            field.label = str(stored.verbose_name).capitalize()
            field.help_text = "Required in the target state by this definition's validators; " + (
                "written together with the transition (not at all if it is refused)."
            )
            if encounter is not None:
                field.initial = stored.value_from_object(encounter)
            self.same_step[name] = FIELD_PREFIX + name
            self.fields[FIELD_PREFIX + name] = field

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

    def changed_fields(self) -> dict[str, Any]:
        """The same-step fields whose value the person changed: model field name -> value."""
        changed = set(self.changed_data)
        return {
            name: self.cleaned_data.get(form_name)
            for name, form_name in self.same_step.items()
            if form_name in changed
        }

    def field_label(self, name: str) -> str:
        return str(model_field(name).verbose_name).capitalize()


class StateAtForm(forms.Form):
    """The "state at …" box of the encounter page (a GET form)."""

    state_at = forms.DateTimeField(label="State at")
    known_at = forms.DateTimeField(label="as known at", required=False)
