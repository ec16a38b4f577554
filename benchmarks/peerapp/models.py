"""The visit workflow of SPEC.md as a django-fsm-2 model whose transitions django-fsm-log
records (one ``StateLog`` row per transition, with who and why)."""

from __future__ import annotations

from django.conf import settings
from django.db import models
from django_fsm import FSMField, transition
from django_fsm_log.decorators import fsm_log_by, fsm_log_description


class FsmVisit(models.Model):
    state = FSMField(default="scheduled")
    subject = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE)

    class Meta:
        app_label = "peerapp"

    @fsm_log_by
    @fsm_log_description
    @transition(field=state, source="scheduled", target="checked_in")
    def check_in(self, by=None, description=None):
        pass

    @fsm_log_by
    @fsm_log_description
    @transition(field=state, source="checked_in", target="in_progress")
    def start(self, by=None, description=None):
        pass

    @fsm_log_by
    @fsm_log_description
    @transition(field=state, source="in_progress", target="completed")
    def complete(self, by=None, description=None):
        pass

    @fsm_log_by
    @fsm_log_description
    @transition(field=state, source=["scheduled", "checked_in"], target="cancelled")
    def cancel(self, by=None, description=None):
        pass


#: The method that moves a visit to each state.
METHOD_TO = {
    "checked_in": "check_in",
    "in_progress": "start",
    "completed": "complete",
    "cancelled": "cancel",
}
