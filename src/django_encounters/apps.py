from django.apps import AppConfig


class DjangoEncountersConfig(AppConfig):
    name = "django_encounters"
    label = "django_encounters"
    verbose_name = "Encounters"
    default_auto_field = "django.db.models.BigAutoField"
