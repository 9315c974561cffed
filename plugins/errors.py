"""The exceptions visionpeft raises.

Every error subclasses :class:`VisionPeftError`; the ones about bad input also subclass
``ValueError`` so that callers catching the standard type keep working.
"""

from __future__ import annotations


class VisionPeftError(Exception):
    """Base class of every error raised by visionpeft."""


class ConfigError(VisionPeftError, ValueError):
    """A config value or key is wrong; the message names the field and what is allowed."""


class RegistryError(VisionPeftError, ValueError):
    """A method or host could not be registered (duplicate name, missing config, bad name)."""


class UnknownMethodError(VisionPeftError, ValueError):
    """No method is registered under the requested name."""


class UnsupportedModelError(VisionPeftError, ValueError):
    """The method cannot adapt this model family."""


class AdapterError(VisionPeftError, ValueError):
    """An adapter operation is not possible in the model's current state."""


class AdapterMismatchError(AdapterError):
    """An adapter file does not fit the model it is loaded onto."""


class NoMatchError(VisionPeftError, ValueError):
    """A module pattern matched nothing in the model."""


class DataError(VisionPeftError, ValueError):
    """A data set cannot be read: a missing or corrupt file, a bad label, an unknown split."""


class TrainingError(VisionPeftError, RuntimeError):
    """Training cannot go on."""


class NonFiniteLossError(TrainingError):
    """The loss became NaN or infinite."""
