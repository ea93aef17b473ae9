"""The errors users are meant to read: the CLI prints them as one line instead of a traceback."""


class SPPOLightningError(Exception):
    """Base of every error caused by the user's data, files or configuration."""


class DataError(SPPOLightningError, ValueError):
    """Bad preference data; the message names the file (or dataset), row and column."""


class ConfigError(SPPOLightningError, ValueError):
    """An impossible or inconsistent configuration; the message names the key."""


class LoadError(SPPOLightningError, OSError):
    """A model, tokenizer or dataset could not be found or loaded."""


class TrainingError(SPPOLightningError, RuntimeError):
    """Training cannot go on (a non-finite loss); what was good has been saved."""


class ServiceError(SPPOLightningError, RuntimeError):
    """A server the run depends on (a judge endpoint) failed for good; the message names its URL."""


class SettingsMismatch(ConfigError):
    """A run folder made with other settings than this run's (``IterationArtifacts``); the data
    module adds the flag that starts a fresh run instead."""
